"""Tests for atm.data.fetch: cache/mirror/URL resolution, checksums, atomic writes, listing."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from atm.data.fetch import RESOURCES, Resource, data_dir, fetch, list_available, mirror_dir
from atm.data.text import open_text, read_lines
from atm.errors import AtmError

MASSIVE = "massive/amazon-massive-dataset-1.1.tar.gz"


@pytest.fixture(scope="module", autouse=True)
def real_data(real_data_env):
    """Every test here reads the real data mirror (see conftest.py)."""
    return real_data_env


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache directory for one test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATM_DATA_DIR", str(cache))
    return cache


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(root: Path) -> list[str]:
    """Every file under root (hidden temporaries included), relative."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# directories


def test_data_dir_default_is_created_on_demand(tmp_path, monkeypatch):
    monkeypatch.delenv("ATM_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    path = data_dir()
    assert path == tmp_path / ".cache" / "atm" / "data"
    assert path.is_dir()


def test_data_dir_from_env(fresh_cache):
    assert not fresh_cache.exists()
    assert data_dir() == fresh_cache
    assert fresh_cache.is_dir()


def test_mirror_dir_unset_is_none(monkeypatch):
    monkeypatch.delenv("ATM_DATA_MIRROR")
    assert mirror_dir() is None


def test_missing_mirror_dir_is_a_one_line_error(fresh_cache, tmp_path, monkeypatch):
    missing = tmp_path / "no-such-mirror"
    monkeypatch.setenv("ATM_DATA_MIRROR", str(missing))
    with pytest.raises(AtmError) as err:
        mirror_dir()
    assert str(err.value) == f"data mirror ATM_DATA_MIRROR={missing} does not exist"
    with pytest.raises(AtmError, match="does not exist"):
        fetch("slurp/dataset/lm/lm.txt.gz")


# ---------------------------------------------------------------------------------------------
# fetch from the mirror


def test_fetch_copies_from_mirror_with_checksum_then_uses_the_cache(fresh_cache, monkeypatch, real_data):
    path = fetch(MASSIVE)
    assert path == fresh_cache / MASSIVE
    assert _sha256(path.read_bytes()) == RESOURCES[MASSIVE].sha256
    assert _files(fresh_cache) == [MASSIVE]  # no temporary file left behind
    # Once cached, neither the mirror nor a URL is needed.
    monkeypatch.delenv("ATM_DATA_MIRROR")
    assert fetch(MASSIVE, resources={}) == path


def test_fetch_mirror_checksum_mismatch_leaves_nothing(fresh_cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "x").mkdir(parents=True)
    (mirror / "x" / "data.txt").write_text("hello\n")
    monkeypatch.setenv("ATM_DATA_MIRROR", str(mirror))
    wrong = "0" * 64
    with pytest.raises(AtmError) as err:
        fetch("x/data.txt", resources={"x/data.txt": Resource("x/data.txt", sha256=wrong)})
    message = str(err.value)
    assert "data.txt" in message and wrong in message and _sha256(b"hello\n") in message
    assert "\n" not in message
    assert _files(fresh_cache) == []


def test_fetch_nowhere_to_be_found(fresh_cache, monkeypatch):
    monkeypatch.delenv("ATM_DATA_MIRROR")
    with pytest.raises(AtmError) as err:
        fetch("xnli/hf_jsonl/en/train.jsonl.gz")
    message = str(err.value)
    assert message.startswith("missing data file 'xnli/hf_jsonl/en/train.jsonl.gz'")
    assert "ATM_DATA_MIRROR" in message and str(fresh_cache) in message


def test_fetch_missing_from_mirror_names_the_mirror(fresh_cache, real_data):
    with pytest.raises(AtmError) as err:
        fetch("xnli/no-such-file.tsv.gz")
    assert str(err.value).startswith("missing data file 'xnli/no-such-file.tsv.gz'")
    assert f"ATM_DATA_MIRROR={real_data}" in str(err.value)


@pytest.mark.parametrize("rel", ["../escape.txt", "/etc/passwd", ""])
def test_fetch_rejects_paths_outside_the_layout(rel):
    with pytest.raises(AtmError, match="relative path"):
        fetch(rel)


# ---------------------------------------------------------------------------------------------
# fetch from a URL (file:// keeps the download path offline)


@pytest.fixture
def upstream(tmp_path) -> Path:
    """A gzipped 'upstream' file served by a file:// URL."""
    path = tmp_path / "upstream" / "corpus.txt.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress("één\ntwee\n\ndrie\n".encode()))
    return path


def test_fetch_downloads_from_file_url_with_checksum(fresh_cache, upstream, monkeypatch):
    monkeypatch.delenv("ATM_DATA_MIRROR")
    rel = "demo/corpus.txt.gz"
    resources = {rel: Resource(rel, upstream.as_uri(), url_sha256=_sha256(upstream.read_bytes()))}
    path = fetch(rel, resources=resources)
    assert path == fresh_cache / rel
    assert path.read_bytes() == upstream.read_bytes()
    assert list(read_lines(path)) == ["één", "twee", "drie"]
    assert _files(fresh_cache) == [rel]


def test_fetch_download_checksum_mismatch_leaves_nothing(fresh_cache, upstream, monkeypatch):
    monkeypatch.delenv("ATM_DATA_MIRROR")
    rel = "demo/corpus.txt.gz"
    wrong = "f" * 64
    with pytest.raises(AtmError) as err:
        fetch(rel, resources={rel: Resource(rel, upstream.as_uri(), url_sha256=wrong)})
    message = str(err.value)
    assert "corpus.txt.gz" in message and wrong in message and _sha256(upstream.read_bytes()) in message
    assert _files(fresh_cache) == []


def test_fetch_plain_upstream_for_gz_name_is_cached_plain(fresh_cache, tmp_path, monkeypatch):
    """UD and SLURP serve plain text that the mirror stores gzipped: readers accept either."""
    monkeypatch.delenv("ATM_DATA_MIRROR")
    plain = tmp_path / "en_demo-ud-dev.conllu"
    plain.write_text("# text = Hi\n1\tHi\thi\tINTJ\t_\t_\t0\troot\t_\t_\n\n", encoding="utf-8")
    rel = "ud/UD_Demo/en_demo-ud-dev.conllu.gz"
    resources = {rel: Resource(rel, plain.as_uri(), url_sha256=_sha256(plain.read_bytes()))}
    path = fetch(rel, resources=resources)
    assert path == fresh_cache / "ud/UD_Demo/en_demo-ud-dev.conllu"
    with open_text(path) as fh:
        assert fh.readline() == "# text = Hi\n"
    # The plain copy satisfies the .gz name from now on, and is listed under it.
    assert fetch(rel, resources={}) == path
    assert list_available("ud/UD_Demo/*-ud-dev.conllu.gz", resources={}) == [rel]


def test_fetch_unreachable_url(fresh_cache, tmp_path, monkeypatch):
    monkeypatch.delenv("ATM_DATA_MIRROR")
    rel = "demo/absent.txt"
    url = (tmp_path / "absent.txt").as_uri()
    with pytest.raises(AtmError, match=r"cannot download 'demo/absent.txt' from file://"):
        fetch(rel, resources={rel: Resource(rel, url)})
    assert _files(fresh_cache) == []


# ---------------------------------------------------------------------------------------------
# the resource table and listing


def test_resource_table_points_at_official_sources():
    massive = RESOURCES[MASSIVE]
    assert massive.url == "https://amazon-massive-nlu-dataset.s3.amazonaws.com/amazon-massive-dataset-1.1.tar.gz"
    assert massive.sha256 == "add3d6f9ce17d04f133ab8eff000da7e71cf57440e97914a3b4f4c92731bbc59"
    ewt = RESOURCES["ud/UD_English-EWT/en_ewt-ud-train.conllu.gz"]
    assert ewt.url.startswith("https://raw.githubusercontent.com/UniversalDependencies/UD_English-EWT/")
    assert ewt.url.endswith("/en_ewt-ud-train.conllu")  # plain upstream
    lm = RESOURCES["slurp/dataset/lm/lm.txt.gz"].url
    assert lm.startswith("https://raw.githubusercontent.com/pswietojanski/slurp/")
    assert lm.endswith("/dataset/lm/lm.txt")
    assert not any(rel.startswith(("xnli/", "udpos_xtreme/")) for rel in RESOURCES)  # mirror only
    for resource in RESOURCES.values():
        for digest in (resource.sha256, resource.url_sha256):
            assert digest is None or len(digest) == 64


def test_every_downloadable_resource_is_in_the_mirror(real_data):
    assert all((real_data / rel).is_file() for rel, r in RESOURCES.items() if r.url)


def test_list_available_from_mirror():
    pud = list_available("ud/*-PUD/*-ud-test.conllu.gz")
    assert len(pud) == 11
    assert "ud/UD_Thai-PUD/th_pud-ud-test.conllu.gz" in pud
    xnli_train = list_available("xnli/hf_jsonl/*/train.jsonl.gz")
    assert [rel.split("/")[2] for rel in xnli_train] == ["de", "en", "es", "fr", "sw", "tr", "vi", "zh"]
    assert len(list_available("udpos_xtreme/train-*.tsv.gz")) == 24
    assert list_available("no/such/*") == []


def test_list_available_includes_downloadable_files_without_mirror(fresh_cache, monkeypatch):
    monkeypatch.delenv("ATM_DATA_MIRROR")
    assert "ud/UD_English-EWT/en_ewt-ud-dev.conllu.gz" in list_available("ud/*/*-ud-dev.conllu.gz")
    assert list_available("xnli/hf_jsonl/*/train.jsonl.gz") == []
