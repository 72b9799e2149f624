"""Where data files come from: a local cache, a mirror directory, or the official download URL.

Files are named by their path in the *mirror layout* (the layout of the project's shared data folder),
e.g. ``massive/amazon-massive-dataset-1.1.tar.gz`` or ``ud/UD_English-EWT/en_ewt-ud-dev.conllu.gz``.
:func:`fetch` resolves such a name to a local file, in this order:

1. the cache, :func:`data_dir` (``$ATM_DATA_DIR``, default ``~/.cache/atm/data``);
2. the mirror, :func:`mirror_dir` (``$ATM_DATA_MIRROR``), copied into the cache;
3. the official URL from :data:`RESOURCES`, downloaded into the cache.

Copies and downloads are written to a temporary file, checked against the known sha256 and only then
renamed into place, so the cache never holds a partial or corrupt file. A file without a known sha256 (XNLI,
udpos_xtreme, mirror copies of UD and SLURP) is instead read through before the rename -- the whole gzip
stream, every JSON record of a ``.jsonl``, every UTF-8 line of a text file, every member of a tar -- and a
cached copy of such a file whose size differs from the mirror's (the mirror was repaired or updated) is copied
again. Upstream UD and SLURP files
are plain text while the mirror holds them gzipped: a ``.gz`` name may therefore be satisfied by a plain
cached copy (the name without ``.gz``); every reader accepts both (:func:`atm.data.text.open_text`).
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import http.client
import logging
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from atm.data.text import (
    _GZIP_MAGIC,
    GZIP_ERRORS,
    decode_lines,
    is_gzip,
    iter_jsonl,
    open_binary,
)
from atm.errors import AtmError
from atm.files import atomic_path

log = logging.getLogger(__name__)

ENV_DATA_DIR = "ATM_DATA_DIR"
ENV_MIRROR = "ATM_DATA_MIRROR"
DEFAULT_DATA_DIR = Path("~/.cache/atm/data")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """A known data file.

    Attributes:
        rel: path in the mirror layout (also the path inside the cache).
        url: official download URL, or None when the file exists only in the mirror.
        sha256: hex sha256 of the file as stored at ``rel`` in the mirror layout, or None if unknown.
        url_sha256: hex sha256 of the bytes served by ``url`` (differs from ``sha256`` when upstream
            serves plain text that the mirror stores gzipped, or a differently packed archive).
    """

    rel: str
    url: str | None = None
    sha256: str | None = None
    url_sha256: str | None = None


def _ud(treebank: str, commit: str, files: Mapping[str, str]) -> list[Resource]:
    """UD files of one treebank, pinned to the commit the mirror copy was taken from.

    ``files`` maps the upstream file name to the sha256 of its (plain) upstream content.
    """
    base = f"https://raw.githubusercontent.com/UniversalDependencies/{treebank}/{commit}"
    return [Resource(f"ud/{treebank}/{name}.gz", f"{base}/{name}", url_sha256=sha) for name, sha in files.items()]


_SLURP_BASE = "https://raw.githubusercontent.com/pswietojanski/slurp/8eb16545762be97ace75334109d73824217311f1"

#: Known files by mirror-layout path. Files not listed here (XNLI, udpos_xtreme: no single official
#: file to download) can still be fetched from a mirror or the cache. UD and SLURP URLs are pinned to
#: the commits the mirror was copied from, so their checksums stay valid when upstream moves on.
RESOURCES: dict[str, Resource] = {
    r.rel: r
    for r in [
        # Our mirror copy is the release layout rebuilt from public copies, not the official archive
        # byte for byte: its checksum is known, the official archive's is not recorded here.
        Resource(
            "massive/amazon-massive-dataset-1.1.tar.gz",
            "https://amazon-massive-nlu-dataset.s3.amazonaws.com/amazon-massive-dataset-1.1.tar.gz",
            sha256="add3d6f9ce17d04f133ab8eff000da7e71cf57440e97914a3b4f4c92731bbc59",
        ),
        Resource(
            "slurp/dataset/slurp/devel.jsonl.gz",
            f"{_SLURP_BASE}/dataset/slurp/devel.jsonl",
            url_sha256="00d346b183ecc2d160853cd3dc20e8ccd207d9e1809cf6e2c05182076bd0ecc9",
        ),
        Resource(
            "slurp/dataset/slurp/test.jsonl.gz",
            f"{_SLURP_BASE}/dataset/slurp/test.jsonl",
            url_sha256="fe3449af69b42fda7163345482556066c35a80f7e552a6d67e212a0e2f0783cc",
        ),
        Resource(
            "slurp/dataset/lm/lm.txt.gz",
            f"{_SLURP_BASE}/dataset/lm/lm.txt",
            url_sha256="295a336c38481b954e23ba42c81b944d48119af7d013eccff456338dd619d754",
        ),
        *_ud("UD_English-EWT", "15d613d8447b3478787d4c278730a1e48a945efb", {
            "en_ewt-ud-train.conllu": "3fb78e2b55482c8ee00caa653af436c88c9e5bc9a73ce26e4ae3ddc79d2b7e7b",
            "en_ewt-ud-dev.conllu": "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6",
            "en_ewt-ud-test.conllu": "e266e515a0a7547657ed3d90d9ba46487d6bd251f27ad4269d4e8a427c8555cd",
        }),
        *_ud("UD_German-GSD", "297fcf350481058d0737a27f0f8fd03b2eadd67a", {
            "de_gsd-ud-dev.conllu": "00431f2624cbbf66796c097a9303bbc8f8e8ca88ef35c4c5664aa396b2d674c9",
            "de_gsd-ud-test.conllu": "bceb8e867ba3ee7f1449d44fb31538d63a514f07e6763e7d9a5ffe794407bed4",
        }),
        *_ud("UD_French-GSD", "830e2782304af08b3cc1c9250475343e04274d81", {
            "fr_gsd-ud-dev.conllu": "3e7531b645e5bd6fe37bb619cdd8292e87f5937e64cd8627b4094324eb830e6b",
            "fr_gsd-ud-test.conllu": "5d1743c7a9ce2908943d4a430ed9a77755e2a8d7e32d42ee0f1d6a0b528f0be8",
        }),
        *_ud("UD_Spanish-GSD", "57c045644664e5c1e169263cc4e3b95e40c078ba", {
            "es_gsd-ud-dev.conllu": "d5018974cb6a4adb03435f76ac4914a388f4fc763b35b6c4a6a2dc27874b0dff",
            "es_gsd-ud-test.conllu": "37612cb7cc13eab62e6f95b06504a31f252ecc56acb52a06d142bf872318b872",
        }),
        *_ud("UD_Japanese-GSD", "7bc20119f476b552635e0640644e577b6fd3606b", {
            "ja_gsd-ud-dev.conllu": "18d266e29336ef619787a928d89d20f2e64188be70d5b37829e3aadc5bb6b841",
            "ja_gsd-ud-test.conllu": "5f50ee6ed45c7ebda3787e593eaf5e9a225f25e53f6b4b32df778031862c843f",
        }),
        *_ud("UD_Chinese-GSDSimp", "eb3aed31ebb170897405ee5cd1db83a1a0b11864", {
            "zh_gsdsimp-ud-dev.conllu": "342a2969df6d6d08bdc25dbc067c93c86ab3099bb054a9921ae7067cbc2c53ad",
            "zh_gsdsimp-ud-test.conllu": "573f59b799b499a920d2d5bdc0e3c1dbd7bcacf86bdece4334ecbd03e21b6150",
        }),
        *_ud("UD_Russian-GSD", "5400f2fd7264b7699727bb61b09f53841899df26", {
            "ru_gsd-ud-dev.conllu": "e3e3d4e8d1d7544e531b2b81ae64257efacc97f93276ce6d2ce52fd1de052fa2",
            "ru_gsd-ud-test.conllu": "f26e022329162a1c6306f76644d06f770f1572501755421165387137fe63138d",
        }),
        *_ud("UD_Turkish-IMST", "bcd48daa9957794a9137d85a4e2a115cdcdd4b1a", {
            "tr_imst-ud-train.conllu": "8d8b8b581dab9362e6f2e4328aef77b9fabec1d189a199e320ba136710c7bd83",
            "tr_imst-ud-dev.conllu": "3bdaab362b7a9af7cbf8944aee5c1c1d077970ad4bcafcf23c5c062d4cf93801",
            "tr_imst-ud-test.conllu": "fc9269bd598489b942a025b678779557266ce0c054a843e47c7db386d76d6459",
        }),
        *_ud("UD_Vietnamese-VTB", "e8fa54835582fb5d0c767f19f0992675726fa084", {
            "vi_vtb-ud-train.conllu": "1df180722db99b724f7368aca50597133bee28606de3394cd8d12a57da89978d",
            "vi_vtb-ud-dev.conllu": "0b779257b9225575b3b30e15d64cc4ef9945a77f8cceb9f92d794b483a2752dd",
            "vi_vtb-ud-test.conllu": "abc1b0ea98661bbb494a8c0da123ba2fe1a3ef71322c380fe66468884d9b4285",
        }),
        *_ud("UD_English-PUD", "f16eba4ae7f3d161870ed320676c5088b8fa476c", {
            "en_pud-ud-test.conllu": "c80584f2bc2b31d5bada78a1136f9feec7ac49e5e18898db02dea434b5b8f0aa",
        }),
        *_ud("UD_German-PUD", "ff80846ae60a0a70fc4d6251ef73e6a483a620ee", {
            "de_pud-ud-test.conllu": "a530bdb50349bbd7c13706b6a759a9d73e8f514fff41fbf27149e914b0c3e723",
        }),
        *_ud("UD_French-PUD", "c245786cfb3020d43bcfc96215ae531a1b07bcbc", {
            "fr_pud-ud-test.conllu": "793540702db111d2bfe04f846edddb23e7a2a432294fe17cb612dd795fb0301f",
        }),
        *_ud("UD_Spanish-PUD", "818a82b8628c9cbec78750c7e83ccba34b9ce22b", {
            "es_pud-ud-test.conllu": "48a7b5c7f409100b24eba90c7397e01f6fecaaf3207315a9a1bda029f77e98d3",
        }),
        # The current Japanese-PUD file is not in the mirror; this older version (UD 2.4) is.
        *_ud("UD_Japanese-PUD", "54b1bff9d9fa5c39423647b25b0a124b05c1c01e", {
            "ja_pud-ud-test.conllu": "5ca56f22fbf184345375a08135f293e4e539b3093d504ea9498c87e175136ef8",
        }),
        *_ud("UD_Hindi-PUD", "8bc630f73e0737ce5ed9eaa97abf11f172ecc9bd", {
            "hi_pud-ud-test.conllu": "3562b7f49420912acad70a45a483f683dcb44624ea92f82e21b29f2ee41a9dff",
        }),
        *_ud("UD_Arabic-PUD", "be733f45d21f42d506c62930f806ed2182a5ee3d", {
            "ar_pud-ud-test.conllu": "a6d574a46815f6d6e7fa2e92944a2bbde0acaad5013010d92a99f1ef711ce17b",
        }),
        *_ud("UD_Chinese-PUD", "2849afd946a8c01b3e9acdf3e7afa8670cf2777d", {
            "zh_pud-ud-test.conllu": "e12582af2e2bbc2e27155ca7dc12b6fc4a037dbc716e1f805d67e34ffb2596b3",
        }),
        *_ud("UD_Russian-PUD", "da5b3816eeaa24283c1d81a48bb1de4d062fc5d5", {
            "ru_pud-ud-test.conllu": "a37e076d24f0c3cfd5d48a11bbfec36026da5dc46180b7a12dc991dc372de1ea",
        }),
        *_ud("UD_Thai-PUD", "516638d39adfbc03fa3e7f7b33ce59555055a2d9", {
            "th_pud-ud-test.conllu": "0eeeaf5cf4352df2fe0b7f114e29d5ab5c1f54476faf64e99313de14d588a31b",
        }),
        *_ud("UD_Turkish-PUD", "63a134a087c8475ea832713b960baba8ff2f9401", {
            "tr_pud-ud-test.conllu": "7c1b6fe01662a7617758fbecdda6af6fc3914ace46b1809d6514af0a1c1df88c",
        }),
    ]
}


def data_dir() -> Path:
    """Return the cache directory (``$ATM_DATA_DIR``, default ``~/.cache/atm/data``), creating it.

    Raises:
        AtmError: the directory cannot be created (e.g. the path is an existing file).
    """
    path = Path(os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AtmError(f"data directory {ENV_DATA_DIR}={path} cannot be created: {exc.strerror}") from None
    return path


def mirror_dir() -> Path | None:
    """Return the mirror directory from ``$ATM_DATA_MIRROR`` (mirror layout), or None when unset.

    Raises:
        AtmError: ``"data mirror ATM_DATA_MIRROR=<path> does not exist"`` when set to a missing directory.
    """
    value = os.environ.get(ENV_MIRROR)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise AtmError(f"data mirror {ENV_MIRROR}={value} does not exist")
    return path


def _variants(rel: str) -> list[str]:
    """Names under which ``rel`` may be stored: itself and, for ``x.gz``, the plain ``x``."""
    return [rel, rel[:-3]] if rel.endswith(".gz") else [rel]


def _find(root: Path | None, rel: str) -> Path | None:
    """The file storing ``rel`` under ``root`` (gzipped or plain), or None."""
    if root is None:
        return None
    return next((root / name for name in _variants(rel) if (root / name).is_file()), None)


def fetch(rel: str, *, resources: Mapping[str, Resource] | None = None) -> Path:
    """Return a local path for the data file ``rel`` (a path in the mirror layout).

    Looks in the cache, then copies from the mirror, then downloads the resource's URL (``http(s)://``
    or ``file://``); copies and downloads are verified against the known sha256 and renamed into the
    cache atomically. A download that is not gzipped for a ``.gz`` name is cached under the plain name.

    Args:
        rel: path in the mirror layout, e.g. ``"massive/amazon-massive-dataset-1.1.tar.gz"``.
        resources: table of known files to use instead of :data:`RESOURCES` (tests use this to point a
            name at a ``file://`` URL).

    Raises:
        AtmError: the file is nowhere to be found (no cache copy, not in the mirror, no URL): the
            message names the file and asks to set ``ATM_DATA_MIRROR``; a download fails; a checksum
            does not match (the message names the file and both hashes; nothing is left behind);
            ``ATM_DATA_MIRROR`` names a missing directory; a copy of a file without a known sha256 that is
            truncated or unreadable (the message names the mirror file or URL and the line; nothing is cached).
    """
    rel = _check_rel(rel)
    cache = data_dir()
    resource = (RESOURCES if resources is None else resources).get(rel, Resource(rel))
    if (found := _find(cache, rel)) and not _outdated(found, cache, resource):
        return found
    mirror = mirror_dir()
    if source := _find(mirror, rel):
        target = cache / source.relative_to(mirror)
        expected = resource.sha256 if source.name == Path(rel).name else None
        log.info("copying %s from the data mirror %s", rel, mirror)
        try:
            with open(source, "rb") as src:
                return _store(src, target, expected, origin=str(source))
        except OSError as exc:
            raise AtmError(f"cannot copy {source} to {target}: {exc.strerror or exc}") from None
    if resource.url:
        log.info("downloading %s from %s", rel, resource.url)
        return _download(resource, cache)
    found_in = f"nor in the data mirror {ENV_MIRROR}={mirror}" if mirror else f"and {ENV_MIRROR} is unset"
    raise AtmError(
        f"missing data file {rel!r}: not in the data directory {cache} {found_in}, and no download URL "
        f"is known; set {ENV_MIRROR} to a directory in the layout of the project's shared data"
    )


def _outdated(cached: Path, cache: Path, resource: Resource) -> bool:
    """True when ``cached`` has no known sha256 and the mirror file of the same name has another size (a copy
    cut short before copies were validated, or a mirror repaired or updated since)."""
    if resource.sha256:
        return False  # verified when it was cached
    try:
        mirror = mirror_dir()
    except AtmError:
        return False  # reported when the mirror is needed
    source = mirror / cached.relative_to(cache) if mirror is not None else None
    if source is None or not source.is_file() or source.stat().st_size == cached.stat().st_size:
        return False
    log.warning("cached %s differs in size from the data mirror's %s: copying it again", cached, source)
    return True


def _check_rel(rel: str) -> str:
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise AtmError(f"data file name {rel!r} must be a relative path inside the data layout")
    return Path(rel).as_posix()


def _download(resource: Resource, cache: Path) -> Path:
    try:
        response = urllib.request.urlopen(resource.url, timeout=60)  # noqa: S310 (http/https/file only)
        with response:
            # Upstream may serve plain text for a name the mirror stores gzipped: then the plain name is used.
            return _store(response, cache / resource.rel, resource.url_sha256, origin=resource.url, plain_ok=True)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise AtmError(
            f"cannot download {resource.rel!r} from {resource.url}: {reason}; set {ENV_MIRROR} to a local mirror"
        ) from None


def _store(src: IO[bytes], target: Path, sha256: str | None, *, origin: str, plain_ok: bool = False) -> Path:
    """Copy ``src`` to ``target`` through a temporary file in the same directory, verifying ``sha256``.

    With ``plain_ok``, content that is not gzipped (no gzip magic bytes at the start) is stored without the
    ``.gz`` suffix of ``target``. The file is renamed into place only after the checksum matched, or, with no
    checksum, after it was read through (:func:`_validate`) (:func:`atm.files.atomic_path`); on any failure the
    temporary file is removed and a checksum mismatch or an unreadable copy raises :class:`AtmError`.
    """
    digest = hashlib.sha256()
    chunk = src.read(_CHUNK)
    while len(chunk) < len(_GZIP_MAGIC) and (more := src.read(_CHUNK)):  # enough bytes to see the magic
        chunk += more
    plain = plain_ok and target.suffix == ".gz" and not chunk.startswith(_GZIP_MAGIC)
    stored = target.with_suffix("") if plain else target
    with atomic_path(stored) as tmp:
        with open(tmp, "wb") as out:
            while chunk:
                digest.update(chunk)
                out.write(chunk)
                chunk = src.read(_CHUNK)
        if sha256 and (actual := digest.hexdigest()) != sha256.lower():
            raise AtmError(
                f"checksum mismatch for {target} from {origin}: expected sha256 {sha256}, got {actual}"
            )
        if not sha256:
            _validate(tmp, stored.name, origin)
    return stored


_TEXT_SUFFIXES = (".jsonl", ".tsv", ".conllu", ".txt", ".json")


def _validate(path: Path, name: str, origin: str) -> None:
    """Read a copy without a known checksum through before it enters the cache (``name``: its file name).

    A gzip stream must be complete (the end-of-stream marker and CRC of every member), a tar archive must list
    to its end, a ``.jsonl`` file must hold one JSON object a line and a text file (``.tsv``, ``.conllu``,
    ``.txt``) must be UTF-8; other files are taken as they are.

    Raises:
        AtmError: naming ``origin`` (the mirror file or URL) and, for a bad record, its line; the caller
            removes the temporary copy, so nothing is cached.
    """
    nothing = "nothing was cached: replace it with a complete copy and rerun"
    try:
        if is_gzip(path):
            with gzip.open(path, "rb") as stream:
                while stream.read(_CHUNK):
                    pass
        base = name.removesuffix(".gz")
        if base.endswith(".tar") or name.endswith(".tgz"):
            with tarfile.open(path, "r:*") as archive:
                for _ in archive:
                    pass
        elif base.endswith(_TEXT_SUFFIXES):
            with open_binary(path) as stream:
                lines = decode_lines(stream, origin)
                for _ in iter_jsonl(lines, origin) if base.endswith(".jsonl") else lines:
                    pass
    except (*GZIP_ERRORS, tarfile.TarError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AtmError(f"{origin}: truncated or corrupt data ({reason}); {nothing}") from None
    except AtmError as exc:
        raise AtmError(f"{exc} ({nothing})") from None


def list_available(pattern: str, *, resources: Mapping[str, Resource] | None = None) -> list[str]:
    """List data files matching a glob, from the cache, the mirror and the downloadable resources.

    ``pattern`` is a glob over mirror-layout paths (``*``, ``?``, ``[...]`` within one path segment), e.g.
    ``"ud/*/*-ud-dev.conllu.gz"`` or ``"xnli/hf_jsonl/*/train.jsonl.gz"``. A plain cached copy of a
    ``.gz`` file is reported under the ``.gz`` name, so results can be passed to :func:`fetch` as-is.
    Hidden files and directories (temporary files, derived caches) are never listed.

    Returns:
        Sorted, de-duplicated mirror-layout paths.

    Raises:
        AtmError: ``ATM_DATA_MIRROR`` names a missing directory.
    """
    names: set[str] = {rel for rel, r in (RESOURCES if resources is None else resources).items() if r.url}
    for root in (data_dir(), mirror_dir()):
        if root is not None:
            for path in root.glob(pattern if not pattern.endswith(".gz") else pattern[:-3] + "*"):
                if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts):
                    names.add(path.relative_to(root).as_posix())
    found = set()
    for name in names:
        for candidate in (name, name + ".gz"):
            if _glob_match(pattern, candidate):
                found.add(candidate)
                break
    return sorted(found)


def _glob_match(pattern: str, name: str) -> bool:
    """Match a mirror-layout path against a glob segment by segment (``*`` does not cross ``/``)."""
    pattern_parts, name_parts = pattern.split("/"), name.split("/")
    return len(pattern_parts) == len(name_parts) and all(map(fnmatch.fnmatchcase, name_parts, pattern_parts))
