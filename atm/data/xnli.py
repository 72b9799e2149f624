"""XNLI readers: XTREME's TSV files (dev labelled, test unlabelled) and the Hugging Face JSON-lines export.

Mirror layout: ``xnli/xtreme_tsv/{dev,test}-<lang>.tsv.gz`` and ``xnli/hf_jsonl/<lang>/{train,test}.jsonl.gz``.
Labels are ints: 0 entailment, 1 neutral, 2 contradiction, -1 unlabelled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from atm.data.fetch import fetch, list_available
from atm.data.text import get_field, numbered_lines, read_jsonl, where
from atm.errors import AtmError

#: Mirror-layout paths of a language's training and labelled test set (``.format(lang=...)``).
TRAIN_FILE = "xnli/hf_jsonl/{lang}/train.jsonl.gz"
TEST_FILE = "xnli/hf_jsonl/{lang}/test.jsonl.gz"
LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
UNLABELLED = -1
_LABEL_IDS = {name: i for i, name in enumerate(LABELS)}


class XnliPair(NamedTuple):
    """A premise/hypothesis pair; ``label`` is 0 entailment, 1 neutral, 2 contradiction, -1 unlabelled."""

    premise: str
    hypothesis: str
    label: int
    lang: str


def read_xnli_tsv(path: str | Path, lang: str) -> Iterator[XnliPair]:
    """Yield pairs from an XTREME XNLI file: ``premise<TAB>hypothesis[<TAB>label]``, no header.

    The label column is a label name (``entailment``/``neutral``/``contradiction``); rows without it
    are unlabelled (label -1). Blank lines are skipped.

    Raises:
        AtmError: ``"<path>:<line>: ..."`` for a wrong column count, an empty text, or an unknown label.
    """
    for lineno, line in numbered_lines(path):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) not in (2, 3):
            raise AtmError(
                f"{where(path, lineno)}: expected 'premise<TAB>hypothesis[<TAB>label]', got {len(cols)} columns"
            )
        if not cols[0].strip() or not cols[1].strip():
            raise AtmError(f"{where(path, lineno)}: empty premise or hypothesis")
        label = UNLABELLED
        if len(cols) == 3:
            label = _LABEL_IDS.get(cols[2].strip(), UNLABELLED)
            if label == UNLABELLED:
                expected = ", ".join(LABELS)
                raise AtmError(f"{where(path, lineno)}: unknown XNLI label {cols[2]!r} (expected {expected})")
        yield XnliPair(cols[0], cols[1], label, lang)


def read_xnli_jsonl(path: str | Path, lang: str) -> Iterator[XnliPair]:
    """Yield pairs from a JSON-lines file of ``{"premise", "hypothesis", "label"}`` records.

    ``label`` is 0/1/2 (or -1, or missing, for unlabelled rows).

    Raises:
        AtmError: ``"<path>:<line>: ..."`` for malformed JSON, a missing/non-string text or a bad label.
    """
    for loc, record in read_jsonl(path):
        premise = get_field(record, "premise", loc)
        hypothesis = get_field(record, "hypothesis", loc)
        label = record.get("label", UNLABELLED)
        if isinstance(label, bool) or label not in (UNLABELLED, *range(len(LABELS))):
            raise AtmError(f"{loc}: bad XNLI label {label!r} (expected 0, 1, 2 or -1)")
        yield XnliPair(premise, hypothesis, label, lang)


def _langs(pattern: str, prefix: str, suffix: str) -> list[str]:
    return [rel[len(prefix) : -len(suffix)] for rel in list_available(pattern)]


def xnli_train_languages() -> list[str]:
    """Return the languages with a training set (``xnli/hf_jsonl/<lang>/train.jsonl.gz``)."""
    return _langs("xnli/hf_jsonl/*/train.jsonl.gz", "xnli/hf_jsonl/", "/train.jsonl.gz")


def xnli_test_languages() -> list[str]:
    """Return the languages with a *labelled* test set (``xnli/hf_jsonl/<lang>/test.jsonl.gz``)."""
    return _langs("xnli/hf_jsonl/*/test.jsonl.gz", "xnli/hf_jsonl/", "/test.jsonl.gz")


def xnli_dev_languages() -> list[str]:
    """Return the languages with a labelled dev set (``xnli/xtreme_tsv/dev-<lang>.tsv.gz``)."""
    return _langs("xnli/xtreme_tsv/dev-*.tsv.gz", "xnli/xtreme_tsv/dev-", ".tsv.gz")


def _check_lang(lang: str, available: list[str], what: str) -> None:
    if lang not in available:
        raise AtmError(f"no XNLI {what} for language {lang!r} (available: {', '.join(available) or 'none'})")


def xnli_train(lang: str = "en") -> list[XnliPair]:
    """Return the 9,000-pair class-balanced training set of ``lang`` (MultiNLI text; MT for non-English).

    Raises:
        AtmError: no training set for ``lang`` (the message lists those available), or a malformed line.
    """
    _check_lang(lang, xnli_train_languages(), "training set")
    return list(read_xnli_jsonl(fetch(TRAIN_FILE.format(lang=lang)), lang))


def xnli_test(lang: str) -> list[XnliPair]:
    """Return the labelled XNLI test set of ``lang`` (5,010 pairs, row-aligned across languages).

    Raises:
        AtmError: no labelled test set for ``lang`` (see :func:`xnli_test_languages`), or a malformed line.
    """
    _check_lang(lang, xnli_test_languages(), "labelled test set")
    return list(read_xnli_jsonl(fetch(TEST_FILE.format(lang=lang)), lang))


def xnli_dev(lang: str) -> list[XnliPair]:
    """Return the labelled XNLI dev set of ``lang`` (2,490 pairs, from XTREME's TSV).

    Raises:
        AtmError: no dev set for ``lang`` (see :func:`xnli_dev_languages`), or a malformed line.
    """
    _check_lang(lang, xnli_dev_languages(), "dev set")
    return list(read_xnli_tsv(fetch(f"xnli/xtreme_tsv/dev-{lang}.tsv.gz"), lang))


def xnli_eval_files() -> dict[str, str]:
    """Return every available XNLI evaluation file (dev and test, both formats) as ``{path: lang}``."""
    files = {rel: rel.split("/")[2] for rel in list_available("xnli/hf_jsonl/*/test.jsonl.gz")}
    for rel in list_available("xnli/xtreme_tsv/*-*.tsv.gz"):
        files[rel] = Path(rel).name.split("-", 1)[1][: -len(".tsv.gz")]
    return files


def read_xnli_file(path: str | Path, lang: str) -> Iterator[XnliPair]:
    """Read an XNLI file in either format, chosen by name (``.jsonl``/``.jsonl.gz`` or ``.tsv``/``.tsv.gz``)."""
    name = Path(path).name.removesuffix(".gz")
    return read_xnli_jsonl(path, lang) if name.endswith(".jsonl") else read_xnli_tsv(path, lang)
