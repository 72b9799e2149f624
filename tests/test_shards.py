"""Your own corpora (issue 12): files by glob (text, gz, JSON lines), Hugging Face datasets, bad files; token shards
built once and reused, atomic under a kill, identical whether built in this process or in workers; batches
through DataLoader workers identical to in-process ones, exact resume, disjoint ranks; the CLI on user text."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from atm.data import corpora
from atm.data.collate import BatchStream, LineExamples, PackedBlocks, mlm_collator
from atm.data.mlflow_datasets import digest
from atm.data.shards import META, TextSource, TokenizedCorpus, build_shard, shard_key, write_shard
from atm.data.sources import configured_sources, sample_lines
from atm.errors import AtmError
from tests.conftest import REPO, TINY, atm_train, finished_runs_by_stage


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from atm.models.tokenizer import train_tokenizer

    lines = [f"the user number {i} says play song {i % 7} and set an alarm for {i % 12} am" for i in range(400)]
    return train_tokenizer(lines, tmp_path_factory.mktemp("tok") / "tokenizer", 100, seed=0)


def _data_cfg(**written) -> dict:
    return OmegaConf.create({"written": {"max_lines_per_source": None, "paths": [], "hf": [], "text_field": "text",
                                         **written},
                             "spoken": {"paths": [], "hf": []}, "shards": {"dir": None, "workers": 1}})


@pytest.fixture()
def corpus_dir(tmp_path, real_data_env):
    """Three files in three formats; one line of each is MASSIVE test text (must be dropped)."""
    from atm.data.massive import massive_utterances

    evaluation = massive_utterances("test", ["en-US"])["en-US"][:3]
    root = tmp_path / "corpus"
    root.mkdir()
    plain = ["the ferry to oslo waits for the tuba quartet", "", "seventeen purple herons counted along the canal", evaluation[0]]
    (root / "a.txt").write_text("\n".join(plain) + "\n", encoding="utf-8")
    with gzip.open(root / "b.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write("my grandmother's typewriter jams on the letter q\n" + evaluation[1] + "\nthe lighthouse keeper grows tomatoes in a bathtub\n")
    records = [{"text": "a glacier of marzipan slid off the bakery roof", "id": 1}, {"text": evaluation[2], "id": 2},
               {"text": "twelve accordions tuned in a disused mine", "id": 3}]
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def test_user_corpora_text_gz_jsonl_decontaminated_and_counted(corpus_dir, tokenizer, tmp_path):
    cfg = _data_cfg(paths=[str(corpus_dir / "*.txt*"), str(corpus_dir / "*.jsonl.gz")],
                    max_lines_per_source=1)  # the cap applies to built-in sources only
    cfg.shards.dir = str(tmp_path / "shards")
    shard = corpora.corpus_shard("written", cfg, tokenizer)
    kept_txt = ["the ferry to oslo waits for the tuba quartet", "seventeen purple herons counted along the canal", "my grandmother's typewriter jams on the letter q",
                "the lighthouse keeper grows tomatoes in a bathtub"]
    kept_json = ["a glacier of marzipan slid off the bakery roof", "twelve accordions tuned in a disused mine"]
    by_name = {c.name: c for c in shard.sources}
    txt, jsonl = by_name[str(corpus_dir / "*.txt*")], by_name[str(corpus_dir / "*.jsonl.gz")]
    assert (txt.read, txt.dropped_evaluation, txt.kept) == (6, 2, 4)
    assert (jsonl.read, jsonl.dropped_evaluation, jsonl.kept) == (3, 1, 2)
    assert txt.digest == digest(kept_txt) and jsonl.digest == digest(kept_json)  # the digest MLflow shows
    assert txt.files == [str(corpus_dir / "a.txt"), str(corpus_dir / "b.txt.gz")]
    assert [shard.line(i).tolist() for i in range(shard.n_lines)] == [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in kept_txt + kept_json]
    assert shard.n_tokens == txt.tokens + jsonl.tokens and isinstance(shard.tokens, np.memmap)
    # the tokenizer stage's sample: the same sources, evaluation text dropped, capped per source
    sample = corpora.tokenizer_lines("written", cfg, 3, seed=0)
    assert len(sample) == 5 and set(sample) <= set(kept_txt + kept_json)
    assert set(corpora.tokenizer_lines("written", cfg, None)) == set(kept_txt + kept_json)


def test_reservoir_sample_is_uniform_seeded_and_in_order(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(f"line {i}" for i in range(100)) + "\n", encoding="utf-8")
    (source,) = configured_sources(_data_cfg(paths=[str(path)]), "written")
    sample = sample_lines(source, 10, seed=3, exclude=None).lines
    assert len(sample) == 10 and sample == sorted(sample, key=lambda s: int(s.split()[1]))
    assert sample == sample_lines(source, 10, seed=3, exclude=None).lines != sample_lines(source, 10, 4, None).lines
    assert sample_lines(source, 10, 3, exclude=frozenset({"line7", "line8"}))[1:] == (100, 2)
    firsts = [int(sample_lines(source, 1, seed, None).lines[0].split()[1]) for seed in range(2000)]
    counts = np.bincount(firsts, minlength=100)  # each line drawn with probability 1/100
    assert counts.min() > 0 and counts.max() < 60


@pytest.mark.parametrize("name, content, message", [
    ("no_field.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', "no_field.jsonl:2: missing field 'text'"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "bad.jsonl:2: malformed JSON"),
    ("latin1.txt", b"fine\ncaf\xe9\n", "latin1.txt:2: not valid UTF-8"),
    ("cut.txt.gz", gzip.compress("\n".join(f"line {i}" for i in range(20000)).encode())[:2000],
     "cut.txt.gz: truncated or corrupt data"),
])
def test_bad_files_fail_with_file_and_line_and_leave_no_shard(tmp_path, tokenizer, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = _data_cfg(paths=[str(path)])
    cfg.shards.dir = str(tmp_path / "shards")
    with pytest.raises(AtmError, match=message.replace(".", r"\.")):
        corpora.corpus_shard("written", cfg, tokenizer)
    assert not any((tmp_path / "shards").glob(f"*/{META}")) and not list((tmp_path / "shards").glob(".*tmp*"))


def test_a_corpus_with_nothing_to_train_on_is_an_error(tmp_path, tokenizer, real_data_env):
    from atm.data.massive import massive_utterances

    path = tmp_path / "eval_only.txt"
    path.write_text("\n\n".join(massive_utterances("dev", ["en-US"])["en-US"][:5]) + "\n")
    cfg = _data_cfg(paths=[str(path)])
    cfg.shards.dir = str(tmp_path / "shards")
    with pytest.raises(AtmError, match=r"data\.written: no text to train on in .*eval_only\.txt \(every line blank"):
        corpora.corpus_shard("written", cfg, tokenizer)


@pytest.mark.parametrize("setting, message", [
    ({"paths": ["/nonexistent/*.txt"]}, "data.written.paths[0]='/nonexistent/*.txt' matches no file"),
    ({"paths": "corpus.txt"}, "data.written.paths='corpus.txt' must be a list of globs"),
    ({"text_field": ""}, "data.written.text_field='' must be a non-empty string"),
    ({"hf": [{"config": "x"}]}, "data.written.hf[0]="),
    ({"hf": [{"name": "json", "colour": "red"}]}, "data.written.hf[0]: unknown key(s) colour"),
])
def test_bad_settings_name_the_key(setting, message):
    with pytest.raises(AtmError) as err:
        configured_sources(_data_cfg(**setting), "written")
    assert message in str(err.value)


@pytest.mark.parametrize("streaming", [False, True])
def test_hugging_face_source_through_datasets(tmp_path, tokenizer, real_data_env, streaming):
    pytest.importorskip("datasets")
    path = tmp_path / "hf.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"remind me to buy milk number {i}"}) for i in range(5)) + "\n")
    cfg = _data_cfg(hf=[{"name": "json", "data_files": [str(path)], "split": "train", "streaming": streaming}],
                    text_field="body")
    cfg.shards.dir = str(tmp_path / "shards")
    shard = corpora.corpus_shard("written", cfg, tokenizer)
    (counts,) = shard.sources
    assert counts.name == "hf:json/train" and counts.kept == 5
    assert counts.digest == digest([f"remind me to buy milk number {i}" for i in range(5)])


# ------------------------------------------------------------------------------ shards: reuse, atomicity, workers


def _lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["play", "song", "alarm", "the", "user", "number", "set", "and", "for", "says"]
    return [" ".join(rng.choice(words, size=int(k))) for k in rng.integers(1, 20, n)]


def test_shard_is_built_once_and_reused_until_an_input_changes(tmp_path, tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(_lines(300)) + "\n")
    cfg = _data_cfg(paths=[str(path)])
    (source,) = configured_sources(cfg, "written")
    root = tmp_path / "shards"
    key = shard_key([source], tokenizer, False)
    first = build_shard([source], tokenizer, root, workers=1)
    meta = Path(first.tokens.filename).parent / META
    stamp = meta.stat().st_mtime_ns
    again = build_shard([source], tokenizer, root, workers=1)
    assert Path(again.tokens.filename) == Path(first.tokens.filename) and meta.stat().st_mtime_ns == stamp
    path.write_text("\n".join(_lines(301)) + "\n")  # another size: another key, another shard
    assert shard_key([source], tokenizer, False) != key
    assert build_shard([source], tokenizer, root, workers=1).n_lines == 301
    assert len(list(root.glob(f"*/{META}"))) == 2


def test_worker_processes_write_the_same_shard_as_one_process(tmp_path, tokenizer):
    sources = [TextSource("a", _lines(5000)), TextSource("b", _lines(3000, seed=1))]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = write_shard(sources, tokenizer, tmp_path / "one", workers=1, chunk_lines=500)
    two = write_shard(sources, tokenizer, tmp_path / "two", workers=2, chunk_lines=500)
    for name in ("tokens.bin", "starts.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert one["sources"] == two["sources"] and one["lines"] == 8000


_KILLED_BUILD = """
import os, signal, sys
from atm.data.shards import TextSource, build_shard
from atm.models.tokenizer import load_tokenizer

class Dies(TextSource):
    def lines(self):
        for i, line in enumerate(self.texts):
            if i == 3000:
                os.kill(os.getpid(), signal.SIGKILL)
            yield line

build_shard([Dies("a", [f"play song {i}" for i in range(5000)])], load_tokenizer(sys.argv[1]), sys.argv[2],
            workers=1)
"""


def test_a_killed_build_leaves_nothing_a_later_run_reads(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    root = tmp_path / "shards"
    killed = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(tmp_path / "tok"), str(root)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [p for p in root.iterdir() if p.is_dir()]
    assert leftovers and all(p.name.startswith(".") and ".tmp-" in p.name for p in leftovers)  # only the temp dir
    with pytest.raises(AtmError, match="not a token shard"):
        TokenizedCorpus.open(leftovers[0])
    shard = build_shard([TextSource("a", [f"play song {i}" for i in range(5000)])], tokenizer, root, workers=1)
    assert shard.n_lines == 5000 and not [p for p in root.iterdir() if ".tmp-" in p.name]  # the stale dir is gone


# ------------------------------------------------------------------------------ batches from shards


@pytest.fixture()
def blocks(tmp_path, tokenizer):
    shard = build_shard([TextSource("a", _lines(2000))], tokenizer, tmp_path / "shards", workers=1)
    return PackedBlocks(shard, 32, tokenizer.bos_token_id, tokenizer.eos_token_id)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "attention_mask"))


def test_loader_workers_give_the_same_batches_and_resume_exactly(blocks, tokenizer):
    collate = mlm_collator(tokenizer, 0.15)
    n = len(blocks) // 16 + 5  # crosses an epoch boundary
    in_process = BatchStream(blocks, 16, collate, seed=7)
    rng = torch.get_rng_state()
    expected = [next(in_process) for _ in range(n)]
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's RNG is not drawn from (a resume restores it)
    workers = BatchStream(blocks, 16, collate, seed=7, workers=2, prefetch=3)
    torch.manual_seed(123)  # the caller's RNG has no say in the masks
    assert all(_same(next(workers), want) for want in expected[:10])
    position = workers.state_dict()
    workers.close()
    resumed = BatchStream(blocks, 16, collate, seed=7, workers=2)
    resumed.load_state_dict(position)
    assert all(_same(next(resumed), want) for want in expected[10:])
    assert not any(_same(expected[0], b) for b in expected[1:])


def test_ranks_read_disjoint_slices_that_cover_each_epoch_once(blocks):
    world = 3

    def ids(items):
        return [tuple(item["input_ids"]) for item in items]

    ranks = [BatchStream(blocks, 4, ids, seed=2).shard(rank, world) for rank in range(world)]
    per_epoch = len(blocks) // (4 * world)
    seen: list[tuple] = []
    for _ in range(per_epoch):
        batches = [set(next(stream)) for stream in ranks]
        assert all(len(b) == 4 for b in batches)
        assert not (batches[0] & batches[1] or batches[0] & batches[2] or batches[1] & batches[2])
        seen.extend(x for b in batches for x in b)
    assert len(seen) == len(set(seen)) == per_epoch * 4 * world  # no block twice in an epoch


def test_line_examples_from_a_shard_truncate(tmp_path, tokenizer):
    shard = build_shard([TextSource("a", ["play song " * 40, "set alarm"])], tokenizer, tmp_path, workers=1)
    long, short = LineExamples(shard, 12, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert len(long["input_ids"]) == 12 and long["input_ids"][-1] == tokenizer.eos_token_id
    assert short["input_ids"][1:-1] == tokenizer("set alarm", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------ the CLI


def test_pretrain_stage1_on_your_own_text(tmp_path, data_env, corpus_dir):
    more = tmp_path / "more.txt"
    more.write_text("\n".join(_lines(400)) + "\n")
    paths = f"data.written.paths=[{corpus_dir}/*.txt*,{more}]"
    result = atm_train(["stage=pretrain_stage1", paths, "data.shards.workers=2", *TINY], tmp_path, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = finished_runs_by_stage(tmp_path)
    (stage1,) = runs["pretrain_stage1"]
    (tokenizer_run,) = runs["train_tokenizer"]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    inputs = {d.dataset.name: d.dataset for d in client.get_run(stage1.info.run_id).inputs.dataset_inputs}
    own = inputs[f"written/{corpus_dir}/*.txt*"]
    profile = json.loads(own.profile)
    assert profile["num_rows"] == 4 and profile["num_rows_read"] == 6 and profile["num_rows_dropped_evaluation"] == 2
    assert own.digest == digest(["the ferry to oslo waits for the tuba quartet", "seventeen purple herons counted along the canal", "my grandmother's typewriter jams on the letter q",
                                 "the lighthouse keeper grows tomatoes in a bathtub"])
    more_profile = json.loads(inputs[f"written/{more}"].profile)
    assert more_profile["num_rows_read"] == 400  # some short random lines are MASSIVE utterances: dropped
    assert more_profile["num_rows"] + more_profile["num_rows_dropped_evaluation"] == 400
    (tmp_path / "dl").mkdir()
    local = client.download_artifacts(stage1.info.run_id, "data/written_sources.json", str(tmp_path / "dl"))
    sources = json.loads(Path(local).read_text())
    assert [s["tokens"] for s in sources["sources"]] and sum(s["tokens"] for s in sources["sources"]) == \
        sources["tokens"] == stage1.data.metrics["data/train_tokens"]
    assert not {"written/ud", "written/udpos_xtreme", "written/xnli"} & set(inputs)  # built-in sources replaced
    metrics = stage1.data.metrics
    assert metrics["data/train_lines"] == 4 + more_profile["num_rows"] and metrics["data/train_tokens"] > 0
    tokenizer_inputs = {d.dataset.name for d in client.get_run(tokenizer_run.info.run_id).inputs.dataset_inputs}
    assert f"written/{more}" in tokenizer_inputs and "spoken/massive" in tokenizer_inputs


def test_cli_paths_matching_nothing_is_a_one_line_error(tmp_path, data_env):
    result = atm_train(["stage=pretrain_stage1", "data.written.paths=[nowhere/*.txt]", *TINY], tmp_path, data_env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "data.written.paths[0]='nowhere/*.txt' matches no file" in lines[0], result.stderr
    assert not (tmp_path / "mlflow.db").exists() or not finished_runs_by_stage(tmp_path)
