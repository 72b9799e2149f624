"""Tests for atm.data.corpora: pretraining and held-out text, and above all: no evaluation text leaks in."""

from __future__ import annotations

import collections
import logging
import re

import pytest

from atm.data.corpora import (
    TextLine,
    evaluation_texts,
    heldout_spoken,
    heldout_written,
    normalize_text,
    spoken_corpus,
    written_corpus,
)
from atm.data.fetch import fetch
from atm.data.massive import massive_locales, massive_utterances
from atm.data.slurp import slurp_lm_lines, slurp_sentences
from atm.data.ud import pud_sentences, read_conllu
from atm.data.xnli import xnli_dev, xnli_test
from atm.errors import AtmError

CAP = 300


@pytest.fixture(scope="module", autouse=True)
def real_data(real_data_env):
    """Every test here reads the real data mirror (see conftest.py)."""
    return real_data_env


@pytest.fixture(scope="module")
def evaluation() -> frozenset[str]:
    return evaluation_texts()


@pytest.fixture(scope="module")
def spoken_full() -> list[TextLine]:
    return spoken_corpus()


@pytest.fixture(scope="module")
def written_full() -> list[TextLine]:
    return written_corpus()


def _normalised(lines) -> set[str]:
    return {normalize_text(line) for line in lines}


# ---------------------------------------------------------------------------------------------
# normalisation and the evaluation-text set


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Wake me up  at FIVE am", "wake me up at five am"),
        ("what's the weather?", "whats the weather"),
        ("Hello , world .", "Hello, world."),  # space-joined tokens vs original spacing
        ("ｆｕｌｌｗｉｄｔｈ １２", "fullwidth 12"),  # NFKC
        ("今週 は 午前五時", "今週は午前五時"),
        ("Straße", "STRASSE"),  # casefold
        ("می\u200cخواهم", "میخواهم"),  # zero-width non-joiner
    ],
)
def test_normalize_text_equates(a, b):
    assert normalize_text(a) == normalize_text(b)


def test_normalize_text_distinguishes():
    assert normalize_text("wake me up at five") != normalize_text("wake me up at six")


def test_evaluation_texts_cover_every_evaluation_split(evaluation):
    assert isinstance(evaluation, frozenset)
    assert evaluation_texts() is evaluation  # cached in-process
    samples = {
        "massive test": massive_utterances("test", ["ja-JP"])["ja-JP"][0],
        "massive dev": massive_utterances("dev", ["sq-AL"])["sq-AL"][-1],
        "slurp devel": slurp_sentences("devel")[0],
        "slurp test": slurp_sentences("test")[-1],
        "xnli test (jsonl)": xnli_test("ur")[17].hypothesis,
        "xnli dev (tsv)": xnli_dev("th")[0].premise,
        "pud": pud_sentences("hi")[999].text,
        "ud dev": next(read_conllu(fetch("ud/UD_Japanese-GSD/ja_gsd-ud-dev.conllu.gz"))).text,
        "ud test": next(read_conllu(fetch("ud/UD_Vietnamese-VTB/vi_vtb-ud-test.conllu.gz"))).text,
    }
    for split, text in samples.items():
        assert normalize_text(text) in evaluation, split
    assert len(evaluation) > 500_000


# ---------------------------------------------------------------------------------------------
# THE KEY TEST: no evaluation-split text in the pretraining corpora


def test_spoken_corpus_has_no_evaluation_text(spoken_full, evaluation):
    assert not _normalised(line.text for line in spoken_full) & evaluation
    # The raw sources do overlap with the evaluation splits, so the filter did real work.
    lm_overlap = _normalised(slurp_lm_lines()) & evaluation
    massive_overlap = _normalised(u for utts in massive_utterances("train").values() for u in utts) & evaluation
    assert len(lm_overlap) > 50 and len(massive_overlap) > 10_000
    assert normalize_text("check for new email") in lm_overlap  # short commands recur in test splits


def test_written_corpus_has_no_evaluation_text(written_full, evaluation):
    assert not _normalised(line.text for line in written_full) & evaluation
    ewt_train = fetch("ud/UD_English-EWT/en_ewt-ud-train.conllu.gz")
    assert len(_normalised(s.text for s in read_conllu(ewt_train)) & evaluation) > 100


def test_corpora_log_dropped_lines(caplog):
    with caplog.at_level(logging.INFO, logger="atm.data.corpora"):
        spoken_corpus(CAP)
        written_corpus(CAP)
    pattern = re.compile(r"(\w+) corpus, source (\w+): \d+ lines read, (\d+) dropped as evaluation")
    dropped = {}
    for record in caplog.records:
        if match := pattern.match(record.getMessage()):
            dropped[match[1], match[2]] = int(match[3])
    assert set(dropped) == {("spoken", "massive"), ("spoken", "slurp_lm"), ("written", "ud"),
                            ("written", "udpos_xtreme"), ("written", "xnli")}  # fmt: skip
    assert all(count > 0 for count in dropped.values()), dropped


# ---------------------------------------------------------------------------------------------
# corpus contents, caps and determinism


def test_spoken_corpus_contents(spoken_full):
    by_source = collections.Counter((line.source, line.lang) for line in spoken_full)
    assert {lang for source, lang in by_source if source == "massive"} == set(massive_locales())
    assert {source for source, _ in by_source} == {"massive", "slurp_lm"}
    assert 11514 * 0.9 < by_source["massive", "en-US"] < 11514
    assert len(_normalised(line.text for line in spoken_full)) == len(spoken_full)  # no repeats


def test_written_corpus_contents(written_full):
    langs = collections.defaultdict(set)
    for line in written_full:
        langs[line.source].add(line.lang)
    assert langs["ud"] == {"en", "tr", "vi"}
    assert {"en", "ar", "zh", "ja", "ur", "tr", "vi", "el", "bg"} <= langs["udpos_xtreme"]
    assert langs["xnli"] == {"de", "en", "es", "fr", "sw", "tr", "vi", "zh"}
    assert all(line.text == line.text.strip() and line.text for line in written_full)
    # XNLI premises repeat across pairs: each is kept once.
    xnli_en = [line.text for line in written_full if line.source == "xnli" and line.lang == "en"]
    assert 9000 < len(xnli_en) < 18000 and len(set(xnli_en)) == len(xnli_en)


def test_capped_corpora_are_seeded_samples(spoken_full):
    capped = spoken_corpus(CAP, seed=0)
    counts = collections.Counter((line.source, line.lang) for line in capped)
    assert max(counts.values()) == CAP and counts["massive", "de-DE"] == CAP
    assert set(capped) <= set(spoken_full)
    assert spoken_corpus(CAP, seed=0) == capped
    assert spoken_corpus(CAP, seed=1) != capped
    assert spoken_corpus(0) == []
    with pytest.raises(AtmError, match="cap must be >= 0 or None, got -1"):
        written_corpus(-1)


def test_capped_written_corpus(written_full):
    capped = written_corpus(CAP, seed=3)
    counts = collections.Counter((line.source, line.lang) for line in capped)
    assert max(counts.values()) <= CAP and counts["ud", "en"] == CAP
    assert set(capped) <= set(written_full)


# ---------------------------------------------------------------------------------------------
# held-out text


def test_heldout_written():
    lines = heldout_written(50)
    counts = collections.Counter(line.lang for line in lines)
    assert counts == {lang: 50 for lang in ["en", "de", "fr", "es", "ja", "zh", "ru", "tr", "vi"]}
    assert {line.source for line in lines} == {"ud_dev"}
    assert len(heldout_written()) == 2001 + 799 + 1476 + 1400 + 507 + 500 + 579 + 1100 + 1123


def test_heldout_spoken(evaluation):
    lines = heldout_spoken(20, locales=["en-US", "ja-JP"])
    assert collections.Counter(line.lang for line in lines) == {"en-US": 20, "ja-JP": 20}
    assert all(normalize_text(line.text) in evaluation for line in lines)
    assert len(heldout_spoken(locales=["de-DE"])) == 2033
    with pytest.raises(AtmError, match="unknown MASSIVE locale 'xx-YY'"):
        heldout_spoken(locales=["xx-YY"])
