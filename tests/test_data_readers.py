"""Tests for the data readers (text, MASSIVE, UD, XNLI, SLURP) on the real files and on tiny bad inputs."""

from __future__ import annotations

import collections
import gzip
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from atm.data.fetch import fetch
from atm.data.massive import (
    CHAR_SPLIT_LOCALES,
    MASSIVE_ARCHIVE,
    MassiveExample,
    intent_labels,
    massive_locales,
    massive_utterances,
    parse_annot_utt,
    read_massive,
    scenario_labels,
    slot_labels,
)
from atm.data.slurp import slurp_lm_lines, slurp_sentences
from atm.data.text import numbered_lines, open_text, read_jsonl, read_lines
from atm.data.ud import NO_TAG, pud_languages, pud_sentences, read_conllu, read_udpos_tsv
from atm.data.xnli import (
    XnliPair,
    read_xnli_jsonl,
    read_xnli_tsv,
    xnli_dev,
    xnli_test,
    xnli_test_languages,
    xnli_train,
)
from atm.errors import AtmError



@pytest.fixture(scope="module", autouse=True)
def real_data(real_data_env):
    """Every test here reads the real data mirror (see conftest.py)."""
    return real_data_env


def _write_gz(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# text


def test_open_text_reads_plain_and_gzip_alike(tmp_path):
    text = "a\r\n  b  \n\nc\rd\n"
    plain = tmp_path / "x.txt"
    plain.write_bytes(text.encode())
    packed = _write_gz(tmp_path / "x.txt.gz", text)
    for path in (plain, packed):
        with open_text(path) as fh:
            assert fh.read() == text
        assert list(read_lines(path)) == ["a", "b", "c\rd"]  # only \n ends a line
        assert [n for n, _ in numbered_lines(path)] == [1, 2, 3, 4]


def test_open_text_missing_file(tmp_path):
    with pytest.raises(AtmError, match="no such file"):
        open_text(tmp_path / "absent.txt")


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(AtmError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        list(read_lines(path))


def test_read_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = _write_gz(tmp_path / "bad.jsonl.gz", '{"a": 1}\n\n{"a": 2,}\n')
    with pytest.raises(AtmError) as err:
        list(read_jsonl(path))
    assert _one_line(err).startswith(f"{path}:3: malformed JSON")
    path = _write_gz(tmp_path / "list.jsonl.gz", "[1, 2]\n")
    with pytest.raises(AtmError, match=rf"^{re.escape(str(path))}:1: expected a JSON object, got list$"):
        list(read_jsonl(path))


# ---------------------------------------------------------------------------------------------
# MASSIVE: BIO conversion


@pytest.mark.parametrize(
    ("annot", "words", "tags"),
    [
        (
            "wake me up at [time : five am] [date : this week]",
            "wake me up at five am this week",
            "O O O O B-time I-time B-date I-date",
        ),
        ("olly quiet", "olly quiet", "O O"),
        ("[device_type : lights] off", "lights off", "B-device_type O"),
        (
            "play [artist_name : the rolling stones]",
            "play the rolling stones",
            "O B-artist_name I-artist_name I-artist_name",
        ),
        ("what's [time : 10:30] like", "what's 10:30 like", "O B-time O"),  # ':' inside the filler
        ("x[date : y]z", "x y z", "O B-date O"),  # brackets touching text are boundaries
        ("  spaced   [place_name :  new   york ]  out ", "spaced new york out", "O B-place_name I-place_name O"),
        ("", "", ""),
    ],
)
def test_parse_annot_utt(annot, words, tags):
    assert parse_annot_utt(annot) == (words.split(), tags.split())


def test_parse_annot_utt_char_split_keeps_ascii_chunks():
    words, tags = parse_annot_utt("olly 暫停 [time : 十秒]", char_split=True)
    assert words == ["olly", "暫", "停", "十", "秒"]
    assert tags == ["O", "O", "O", "B-time", "I-time"]
    assert parse_annot_utt("[date : 今週] は", char_split=True) == (["今", "週", "は"], ["B-date", "I-date", "O"])


@pytest.mark.parametrize(
    ("annot", "why"),
    [
        ("wake me at [time : five", "unclosed '['"),
        ("wake me at five]", "']' without '['"),
        ("[time : [date : now]]", "nested '['"),
        ("wake [time five] now", "has no ' : '"),
        ("wake [time :five] now", "has no ' : '"),
        ("wake [ : five] now", "bad slot type ''"),
        ("wake [my time : five] now", "bad slot type 'my time'"),
        ("wake [time : ] now", "slot 'time' has no words"),
    ],
)
def test_parse_annot_utt_malformed(annot, why):
    with pytest.raises(AtmError) as err:
        parse_annot_utt(annot, "data/en-US.jsonl:42")
    message = _one_line(err)
    assert message.startswith("data/en-US.jsonl:42: malformed slot annotation (")
    assert why in message and message.endswith(repr(annot))


# ---------------------------------------------------------------------------------------------
# MASSIVE: the real archive


def test_massive_locales():
    locales = massive_locales()
    assert len(locales) == 48 and locales == sorted(locales)
    assert {"en-US", "de-DE", "ja-JP", "zh-CN", "zh-TW", "th-TH"} <= set(locales)


def test_read_massive_en_us_counts_and_fields():
    examples = read_massive(["en-US"])
    assert collections.Counter(ex.partition for ex in examples) == {"train": 11514, "dev": 2033, "test": 2974}
    first = examples[0]
    assert first == MassiveExample(
        id="0", locale="en-US", partition="test", scenario="alarm", intent="alarm_set",
        utt="wake me up at five am this week",
        words=("wake", "me", "up", "at", "five", "am", "this", "week"),
        slot_tags=("O", "O", "O", "O", "B-time", "I-time", "B-date", "I-date"),
    )  # fmt: skip
    for ex in examples:
        assert ex.words == tuple(ex.utt.split())
        assert len(ex.slot_tags) == len(ex.words)
    assert read_massive("en-US", "dev") == [ex for ex in examples if ex.partition == "dev"]


def test_read_massive_every_locale_dev():
    """Every dev record of every locale parses; ids are parallel across locales."""
    examples = read_massive(partitions=["dev"])
    by_locale = collections.defaultdict(list)
    for ex in examples:
        by_locale[ex.locale].append(ex)
    assert sorted(by_locale) == massive_locales()
    reference = {ex.id: (ex.scenario, ex.intent) for ex in by_locale["en-US"]}
    known_tags = set(slot_labels())
    for locale, rows in by_locale.items():
        assert len(rows) == 2033
        assert {ex.id: (ex.scenario, ex.intent) for ex in rows} == reference
        for ex in rows:
            assert set(ex.slot_tags) <= known_tags
            if locale in CHAR_SPLIT_LOCALES:
                assert "".join(ex.words) == "".join(ex.utt.split())
            else:
                assert ex.words == tuple(ex.utt.split())


def test_read_massive_char_split_locales():
    ja = {ex.id: ex for ex in read_massive(["ja-JP"], ["test"])}
    assert ja["0"].utt == "今週は午前五時に起こして"
    assert ja["0"].words[:4] == ("今", "週", "は", "午")
    assert ja["0"].slot_tags[:4] == ("B-date", "I-date", "O", "B-time")
    # Without character splitting the words are annot_utt's whitespace tokens (slot-boundary spaces).
    plain = {ex.id: ex for ex in read_massive(["ja-JP"], ["test"], char_split_locales=())}
    assert plain["0"].words == ("今週", "は", "午前五時", "に起こして")


def test_read_massive_unknown_locale():
    with pytest.raises(AtmError) as err:
        read_massive(["xx-YY"])
    message = _one_line(err)
    assert message.startswith("unknown MASSIVE locale 'xx-YY' (available: af-ZA, ")
    assert "en-US" in message
    with pytest.raises(AtmError, match="unknown MASSIVE partition 'validation'"):
        read_massive(["en-US"], ["validation"])


def test_massive_labels():
    intents, scenarios, slots = intent_labels(), scenario_labels(), slot_labels()
    assert len(intents) == 60 and intents == sorted(intents) and "alarm_set" in intents
    assert len(scenarios) == 18 and "alarm" in scenarios
    assert slots[0] == "O" and len(slots) == 1 + 2 * 55
    assert slots[1:3] == ["B-alarm_type", "I-alarm_type"]


def test_massive_utterances():
    train = massive_utterances("train", ["en-US", "de-DE"])
    assert sorted(train) == ["de-DE", "en-US"]
    assert len(train["en-US"]) == len(train["de-DE"]) == 11514
    train["en-US"].clear()  # callers get copies
    assert len(massive_utterances("train", ["en-US"])["en-US"]) == 11514


def _bad_archive(root: Path, lines: list[str]) -> Path:
    """A MASSIVE archive with one locale ``xx-XX`` holding ``lines``, placed in the cache at ``root``."""
    path = root / MASSIVE_ARCHIVE
    path.parent.mkdir(parents=True)
    data = "".join(line + "\n" for line in lines).encode()
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo("1.1/data/xx-XX.jsonl")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return path


def _record(**fields) -> str:
    record = dict(id="1", locale="xx-XX", partition="train", scenario="alarm", intent="alarm_set",
                  utt="wake me up", annot_utt="wake me up")  # fmt: skip
    return json.dumps({**record, **fields})


def test_read_massive_malformed_json_names_archive_member_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ATM_DATA_DIR", str(tmp_path))
    archive = _bad_archive(tmp_path, [_record(), '{"id": "2", "locale": "xx-XX"'])
    with pytest.raises(AtmError) as err:
        read_massive()
    assert _one_line(err).startswith(f"{archive}:1.1/data/xx-XX.jsonl:2: malformed JSON")


def test_read_massive_malformed_annotation_names_archive_member_and_line(tmp_path, monkeypatch):
    monkeypatch.setenv("ATM_DATA_DIR", str(tmp_path))
    archive = _bad_archive(tmp_path, [_record(), _record(id="2", annot_utt="wake [time : me up")])
    with pytest.raises(AtmError) as err:
        read_massive(["xx-XX"])
    expected = f"{archive}:1.1/data/xx-XX.jsonl:2: malformed slot annotation (unclosed '[')"
    assert _one_line(err).startswith(expected)


def test_read_massive_optional_and_missing_fields(tmp_path, monkeypatch):
    # worker_id / slot_method / judgments are optional (absent from most records); intent is not.
    lines = [_record(), _record(id="2", worker_id="7", slot_method=[], judgments=[])]
    monkeypatch.setenv("ATM_DATA_DIR", str(tmp_path / "ok"))
    _bad_archive(tmp_path / "ok", lines)
    assert [ex.id for ex in read_massive(["xx-XX"])] == ["1", "2"]
    monkeypatch.setenv("ATM_DATA_DIR", str(tmp_path / "bad"))
    no_intent = json.dumps({k: v for k, v in json.loads(_record(id="3")).items() if k != "intent"})
    archive = _bad_archive(tmp_path / "bad", [*lines, no_intent])
    where = re.escape(f"{archive}:1.1/data/xx-XX.jsonl:3")
    with pytest.raises(AtmError, match=rf"^{where}: missing field 'intent'$"):
        read_massive(["xx-XX"])


def test_read_massive_locale_must_match_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ATM_DATA_DIR", str(tmp_path))
    archive = _bad_archive(tmp_path, [_record(locale="en-US")])
    where = re.escape(f"{archive}:1.1/data/xx-XX.jsonl:1")
    with pytest.raises(AtmError, match=rf"^{where}: record locale 'en-US' does not match its file$"):
        read_massive()


# ---------------------------------------------------------------------------------------------
# UD


def test_read_conllu_ewt_dev():
    sentences = list(read_conllu(fetch("ud/UD_English-EWT/en_ewt-ud-dev.conllu.gz"), "en"))
    assert len(sentences) == 2001
    assert sum(len(s.words) for s in sentences) == 25147  # syntactic words (SOURCE.md)
    assert all(len(s.words) == len(s.upos) and s.lang == "en" and s.text for s in sentences)
    assert len({s.sent_id for s in sentences}) == 2001
    # Multiword tokens contribute their syntactic words, not the surface token.
    with_mwt = next(s for s in sentences if "n't" in s.words)
    assert "n't" not in with_mwt.text.split()


def test_pud_sentences_every_language():
    assert pud_languages() == ["en", "de", "fr", "es", "ja", "hi", "ar", "zh", "ru", "th", "tr"]
    for lang in pud_languages():
        sentences = pud_sentences(lang)
        assert len(sentences) == 1000, lang
        assert all(s.lang == lang and s.text and len(s.words) == len(s.upos) for s in sentences)
        assert "NOUN" in {tag for s in sentences for tag in s.upos}
    en = pud_sentences("en")
    assert sum(len(s.words) for s in en) == 21180
    with pytest.raises(AtmError, match="unknown PUD language 'xx'"):
        pud_sentences("xx")


def test_read_conllu_rebuilds_missing_text_and_skips_ranges_and_empty_nodes(tmp_path):
    lines = [
        "# sent_id = s1",
        "1-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_",
        "1\tdo\tdo\tAUX\t_\t_\t0\troot\t_\t_",
        "2\tn't\tnot\tPART\t_\t_\t1\tadvmod\t_\t_",
        "3\tgo\tgo\tVERB\t_\t_\t1\txcomp\t_\tSpaceAfter=No",
        "3.1\tgone\tgo\tVERB\t_\t_\t_\t_\t_\t_",
        "4\t!\t!\tPUNCT\t_\t_\t1\tpunct\t_\tSpaceAfter=No",
        "",
    ]
    path = tmp_path / "x.conllu"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (sentence,) = read_conllu(path)
    assert sentence.text == "don't go!"
    assert sentence.words == ("do", "n't", "go", "!")
    assert sentence.upos == ("AUX", "PART", "VERB", "PUNCT")
    assert sentence.sent_id == "s1" and sentence.lang is None


def test_read_conllu_wrong_column_count_names_file_and_line(tmp_path):
    path = _write_gz(tmp_path / "bad.conllu.gz", "# text = a b\n1\ta\ta\tX\t_\t_\t0\troot\t_\t_\n2\tb\tb\tX\n\n")
    with pytest.raises(AtmError) as err:
        list(read_conllu(path))
    assert _one_line(err) == f"{path}:3: CoNLL-U token line has 4 columns, expected 10"


def test_read_udpos_train_and_unlabelled_test():
    train = list(read_udpos_tsv(fetch("udpos_xtreme/train-en.tsv.gz"), "en"))
    # SOURCE.md says 21,252: it counts blank separator lines; the file has no blank line after the last one.
    assert len(train) == 21253
    assert sum(len(s.words) for s in train) == 375194
    assert train[0].text == " ".join(train[0].words) and train[0].upos[0] == "PROPN"
    test = list(read_udpos_tsv(fetch("udpos_xtreme/test-th.tsv.gz"), "th"))
    assert len(test) == 1000 and set(test[0].upos) == {NO_TAG}  # Thai PUD; XTREME strips test tags


def test_read_udpos_malformed_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("a\tDET\nb\tNOUN\textra\n\nc\tX\n", encoding="utf-8")
    with pytest.raises(AtmError, match=rf"^{re.escape(str(path))}:2: expected 'token<TAB>UPOS'"):
        list(read_udpos_tsv(path, "xx"))


# ---------------------------------------------------------------------------------------------
# XNLI


def test_xnli_test_dev_train_counts():
    assert xnli_test_languages() == ["ar", "de", "en", "es", "fr", "hi", "sw", "tr", "ur", "vi", "zh"]
    test = xnli_test("en")
    assert len(test) == 5010
    assert collections.Counter(p.label for p in test) == {0: 1670, 1: 1670, 2: 1670}
    assert test[0] == XnliPair(
        "Well, I wasn't even thinking about that, but I was so frustrated, and, I ended up talking to him again.",
        "I havent spoken to him again.", 2, "en",
    )  # fmt: skip
    assert [p.label for p in xnli_test("de")] == [p.label for p in test]  # row-aligned
    dev = xnli_dev("hi")
    assert len(dev) == 2490 and collections.Counter(p.label for p in dev) == {0: 830, 1: 830, 2: 830}
    train = xnli_train()
    assert len(train) == 9000 and {p.lang for p in train} == {"en"}


def test_xnli_unlabelled_tsv_and_unknown_language():
    pairs = list(read_xnli_tsv(fetch("xnli/xtreme_tsv/test-th.tsv.gz"), "th"))
    assert len(pairs) == 5010 and {p.label for p in pairs} == {-1}
    with pytest.raises(AtmError, match=r"no XNLI labelled test set for language 'th' \(available: ar, "):
        xnli_test("th")


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        ("p\th\tentailment\np\th\tmaybe\n", 2, "unknown XNLI label 'maybe'"),
        ("p\th\tneutral\njust one column\n", 2, "got 1 columns"),
        ("p\th\tneutral\tx\n", 1, "got 4 columns"),
    ],
)
def test_read_xnli_tsv_errors(tmp_path, content, line, what):
    path = _write_gz(tmp_path / "dev-xx.tsv.gz", content)
    with pytest.raises(AtmError) as err:
        list(read_xnli_tsv(path, "xx"))
    message = _one_line(err)
    assert message.startswith(f"{path}:{line}: ") and what in message


@pytest.mark.parametrize(
    ("content", "what"),
    [
        ('{"premise": "p", "hypothesis": "h", "label": 3}', "bad XNLI label 3"),
        ('{"premise": "p", "hypothesis": "h", "label": "neutral"}', "bad XNLI label 'neutral'"),
        ('{"premise": "p", "label": 0}', "missing field 'hypothesis'"),
        ('{"premise": "p", "hypothesis": "h", "label": 0', "malformed JSON"),
    ],
)
def test_read_xnli_jsonl_errors(tmp_path, content, what):
    path = tmp_path / "test.jsonl"
    path.write_text('{"premise": "a", "hypothesis": "b", "label": 1}\n' + content + "\n", encoding="utf-8")
    with pytest.raises(AtmError) as err:
        list(read_xnli_jsonl(path, "xx"))
    message = _one_line(err)
    assert message.startswith(f"{path}:2: ") and what in message


# ---------------------------------------------------------------------------------------------
# SLURP


def test_slurp_counts():
    assert len(slurp_sentences("devel")) == 2033
    test = slurp_sentences("test")
    assert len(test) == 2974 and test[0] == "event reminder mona tuesday"
    assert len(slurp_lm_lines()) == 29104
    with pytest.raises(AtmError, match="unknown SLURP split 'train'"):
        slurp_sentences("train")
