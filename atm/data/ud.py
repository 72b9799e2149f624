"""Universal Dependencies readers: CoNLL-U treebanks and the XTREME ``udpos`` token/UPOS files.

Both give :class:`UdSentence` records (raw text, syntactic words and their UPOS tags). Treebank files
are addressed in the mirror layout (``ud/<treebank>/<file>.conllu.gz``) and obtained via
:func:`atm.data.fetch.fetch`; the readers also accept any local path, plain or gzipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from atm.data.fetch import fetch, list_available
from atm.data.text import numbered_lines, where
from atm.errors import AtmError

#: Placeholder tag for tokens without a UPOS annotation (CoNLL-U's "unspecified").
NO_TAG = "_"

#: The 11 parallel PUD test sets: language code -> mirror-layout path.
PUD_FILES: dict[str, str] = {
    lang: f"ud/UD_{name}-PUD/{lang}_pud-ud-test.conllu.gz"
    for lang, name in [
        ("en", "English"), ("de", "German"), ("fr", "French"), ("es", "Spanish"), ("ja", "Japanese"),
        ("hi", "Hindi"), ("ar", "Arabic"), ("zh", "Chinese"), ("ru", "Russian"), ("th", "Thai"),
        ("tr", "Turkish"),
    ]
}  # fmt: skip


@dataclass(frozen=True)
class UdSentence:
    """One sentence: raw ``text``, syntactic ``words`` with their ``upos`` tags, language and id.

    ``upos[i]`` is the tag of ``words[i]`` (:data:`NO_TAG` where the source has none). ``sent_id`` is the
    CoNLL-U ``# sent_id`` (or ``"<file>:<line>"`` of the sentence's first line when absent).
    """

    text: str
    words: tuple[str, ...]
    upos: tuple[str, ...]
    lang: str | None
    sent_id: str


def read_conllu(path: str | Path, lang: str | None = None) -> Iterator[UdSentence]:
    """Yield the sentences of a CoNLL-U file (plain or gzipped).

    ``text`` comes from the ``# text =`` comment; when it is missing, it is rebuilt from the surface
    tokens and their ``SpaceAfter=No`` marks. Multiword-token ranges (``1-2``) and empty nodes (``1.1``)
    contribute no words (the syntactic words carry the UPOS tags).

    Args:
        path: a local file.
        lang: language code stored on every sentence (the file does not say).

    Raises:
        AtmError: ``"<path>:<line>: ..."`` for a token line without 10 tab-separated columns, a bad
            token id, or a sentence without words.
    """
    block: list[tuple[int, str]] = []
    for lineno, line in numbered_lines(path):
        if line.strip():
            block.append((lineno, line))
        elif block:
            yield _conllu_sentence(block, path, lang)
            block = []
    if block:
        yield _conllu_sentence(block, path, lang)


def _conllu_sentence(block: list[tuple[int, str]], path: str | Path, lang: str | None) -> UdSentence:
    comments: dict[str, str] = {}
    words: list[str] = []
    upos: list[str] = []
    surface: list[str] = []  # tokens as written, to rebuild the text when "# text" is missing
    covered_to = 0  # last word id covered by a multiword-token range
    for lineno, line in block:
        if line.startswith("#"):
            key, sep, value = line[1:].partition("=")
            if sep:
                comments.setdefault(key.strip(), value.strip())
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise AtmError(f"{where(path, lineno)}: CoNLL-U token line has {len(cols)} columns, expected 10")
        token_id, form, tag, misc = cols[0], cols[1], cols[3], cols[9]
        space = "" if "SpaceAfter=No" in misc.split("|") else " "
        if "-" in token_id:  # multiword token: its surface form stands for the words it spans
            first, _, last = token_id.partition("-")
            if not (first.isdigit() and last.isdigit()):
                raise AtmError(f"{where(path, lineno)}: bad multiword token id {token_id!r}")
            covered_to = int(last)
            surface.append(form + space)
        elif "." in token_id:  # empty node: not a word of the sentence
            continue
        elif token_id.isdigit():
            words.append(form)
            upos.append(tag)
            if int(token_id) > covered_to:
                surface.append(form + space)
        else:
            raise AtmError(f"{where(path, lineno)}: bad token id {token_id!r}")
    if not words:
        raise AtmError(f"{where(path, block[0][0])}: CoNLL-U sentence has no words")
    text = comments.get("text") or "".join(surface).strip()
    return UdSentence(text, tuple(words), tuple(upos), lang, comments.get("sent_id") or where(path, block[0][0]))


def read_udpos_tsv(path: str | Path, lang: str) -> Iterator[UdSentence]:
    """Yield the sentences of an XTREME ``udpos`` file: ``token<TAB>UPOS`` lines, blank line between sentences.

    XTREME's test files carry tokens only (one column); those tokens get the tag :data:`NO_TAG`.
    ``text`` is the words joined with single spaces (the original spacing is not kept by the format);
    ``sent_id`` is ``"<path>:<first line>"``.

    Raises:
        AtmError: ``"<path>:<line>: ..."`` for a line with more than two columns or an empty token.
    """
    words: list[str] = []
    upos: list[str] = []
    start = 0
    for lineno, line in numbered_lines(path):
        if not line.strip():
            if words:
                yield UdSentence(" ".join(words), tuple(words), tuple(upos), lang, where(path, start))
                words, upos = [], []
            continue
        cols = line.split("\t")
        if len(cols) > 2 or not cols[0].strip():
            raise AtmError(f"{where(path, lineno)}: expected 'token<TAB>UPOS' or 'token', got {line[:80]!r}")
        if not words:
            start = lineno
        words.append(cols[0])
        upos.append(cols[1] if len(cols) == 2 and cols[1] else NO_TAG)
    if words:
        yield UdSentence(" ".join(words), tuple(words), tuple(upos), lang, where(path, start))


def pud_languages() -> list[str]:
    """Return the language codes of the 11 parallel PUD test sets (en de fr es ja hi ar zh ru th tr)."""
    return list(PUD_FILES)


def pud_sentences(lang: str) -> list[UdSentence]:
    """Return the 1,000 sentences of the PUD test set for ``lang`` (fetched via :func:`fetch`).

    Raises:
        AtmError: unknown language (the message lists the available ones), or the file is missing.
    """
    try:
        rel = PUD_FILES[lang]
    except KeyError:
        raise AtmError(f"unknown PUD language {lang!r} (available: {', '.join(PUD_FILES)})") from None
    return list(read_conllu(fetch(rel), lang))


def ud_files(split: str) -> dict[str, str]:
    """Return the available UD treebank files of a split as ``{mirror path: language code}``.

    ``split`` is ``"train"``, ``"dev"`` or ``"test"`` (PUD test sets included). The language code is
    the file-name prefix (``en_ewt-ud-dev.conllu`` -> ``en``).
    """
    return {rel: Path(rel).name.split("_", 1)[0] for rel in list_available(f"ud/*/*-ud-{split}.conllu.gz")}


def udpos_files(split: str) -> dict[str, str]:
    """Return the available XTREME udpos files of a split as ``{mirror path: language code}``."""
    files = list_available(f"udpos_xtreme/{split}-*.tsv.gz")
    return {rel: Path(rel).name.removeprefix(f"{split}-").removesuffix(".tsv.gz") for rel in files}
