"""Tests of atm.models.tokenizer on real text (SLURP lm.txt, XNLI German training pairs)."""

from __future__ import annotations

import gzip
import json
import unicodedata
from itertools import islice
from pathlib import Path

import pytest

from atm.errors import AtmError
from atm.models.tokenizer import (
    SPECIAL_TOKENS,
    check_compatible,
    load_tokenizer,
    tokenizer_stats,
    train_tokenizer,
)

from conftest import MIRROR as DATA  # noqa: E402
SLURP_LM = DATA / "slurp" / "dataset" / "lm" / "lm.txt.gz"
XNLI_DE = DATA / "xnli" / "hf_jsonl" / "de" / "train.jsonl.gz"
VOCAB = 1000


def _slurp(start: int, stop: int) -> list[str]:
    with gzip.open(SLURP_LM, "rt", encoding="utf-8") as f:
        return [line.strip() for line in islice(f, start, stop)]


def _xnli_de(start: int, stop: int) -> list[str]:
    out = []
    with gzip.open(XNLI_DE, "rt", encoding="utf-8") as f:
        for line in islice(f, start, stop):
            rec = json.loads(line)
            out += [rec["premise"], rec["hypothesis"]]
    return out


@pytest.fixture(scope="module")
def lines() -> list[str]:
    if not (SLURP_LM.is_file() and XNLI_DE.is_file()):
        pytest.skip(f"real data not found under {DATA} (set ATM_DATA_MIRROR)")
    return _slurp(0, 3000) + _xnli_de(0, 1000)  # 3000 + 2000 lines, English spoken + German written


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    return _slurp(20000, 20300) + _xnli_de(5000, 5150)


@pytest.fixture(scope="module")
def tok_dir(lines, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(lines, out, VOCAB, seed=0)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_files_and_special_ids(tok, tok_dir):
    names = {p.name for p in tok_dir.iterdir()}
    assert {"spm.model", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in tok_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert len(tok) == VOCAB
    assert SPECIAL_TOKENS == {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for piece, i in SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(piece) == i
    ids = (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id)
    assert ids == (0, 1, 2, 3, 4)
    assert (tok.cls_token_id, tok.sep_token_id) == (0, 2)
    ids = tok("wake me up at seven")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and 3 not in ids
    pair = tok("wake me up", "set an alarm")["input_ids"]
    assert pair.count(2) == 3  # <s> A </s></s> B </s>
    assert tok("play <mask> please")["input_ids"].count(4) == 1


def test_encode_decode_round_trip(tok, held_out):
    checked = 0
    for text in held_out:
        ids = tok(text)["input_ids"]
        if tok.unk_token_id in ids:
            continue
        expected = " ".join(unicodedata.normalize("NFKC", text).split())
        assert tok.decode(ids, skip_special_tokens=True) == expected
        checked += 1
    assert checked > 300


def test_matches_sentencepiece_segmentation(tok, tok_dir, held_out):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spm.model"))
    assert sp.get_piece_size() == len(tok)
    tricky = [
        "ｗａｋｅ ｍｅ ｕｐ",  # full-width letters -> NFKC ASCII
        "Ä\u0308pfel und A\u0308pfel",  # combining diaeresis -> composed
        "ﬁle ② ½ ™",  # ligature, circled digit, fraction, trademark
        "  too   many    spaces  ",
        "中文 und 😀 emoji",  # characters outside the vocabulary -> <unk>
    ]
    for text in held_out + tricky:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tok.tokenize("ｗａｋｅ ｍｅ ｕｐ") == tok.tokenize("wake me up")  # NFKC applied


def test_save_load_round_trip(tok, tok_dir, tmp_path, held_out):
    again = load_tokenizer(tok_dir)
    assert again.get_vocab() == tok.get_vocab()
    copy = tmp_path / "copy"
    tok.save_pretrained(copy)
    reloaded = load_tokenizer(copy)
    for text in held_out[:50]:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"]


def test_deterministic_given_lines_and_seed(lines, tmp_path):
    a = train_tokenizer(lines, tmp_path / "a", 500, seed=3, max_sentences=2000)
    b = train_tokenizer(lines, tmp_path / "b", 500, seed=3, max_sentences=2000)
    c = train_tokenizer(lines, tmp_path / "c", 500, seed=4, max_sentences=2000)
    assert a.get_vocab() == b.get_vocab()
    assert (tmp_path / "a" / "spm.model").read_bytes() == (tmp_path / "b" / "spm.model").read_bytes()
    assert a.get_vocab() != c.get_vocab()  # another sample of 2000 of the 5000 lines
    args = json.loads((tmp_path / "a" / "atm_tokenizer.json").read_text())
    assert args["n_sentences"] == 2000 and args["seed"] == 3


def test_vocab_too_large_names_the_maximum(lines, tok_dir, tmp_path):
    with pytest.raises(AtmError, match=r"vocab_size=5000 is too large.*at most (\d+)") as info:
        train_tokenizer(lines[:30], tmp_path / "small", 5000)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "small").exists()
    # a failed training leaves an existing directory untouched
    before = (tok_dir / "tokenizer.json").read_bytes()
    with pytest.raises(AtmError):
        train_tokenizer(lines[:30], tok_dir, 5000)
    assert (tok_dir / "tokenizer.json").read_bytes() == before


def test_bad_arguments(tmp_path):
    with pytest.raises(AtmError, match="no non-empty training line"):
        train_tokenizer(["", "   "], tmp_path / "t", 100)
    with pytest.raises(AtmError, match="vocab_size"):
        train_tokenizer(["a b c"], tmp_path / "t", 3)
    with pytest.raises(AtmError, match="character_coverage"):
        train_tokenizer(["a b c"], tmp_path / "t", 100, character_coverage=1.5)


def test_load_missing_names_the_path(tmp_path):
    with pytest.raises(AtmError, match=str(tmp_path / "nope")):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtmError, match="empty.*no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def _hand_tokenizer():
    from transformers import XLMRobertaTokenizer

    vocab = [(p, 0.0) for p in SPECIAL_TOKENS] + [
        ("▁", -2.0), ("▁wake", -3.0), ("▁me", -3.0), ("▁up", -3.0), ("▁hallo", -3.0),
        ("w", -5.0), ("a", -5.0), ("k", -5.0), ("e", -5.0),
    ]
    return XLMRobertaTokenizer(vocab=vocab)


def test_stats_hand_checked():
    tok = _hand_tokenizer()
    # "wake me up" -> ▁wake ▁me ▁up (3 tokens, 3 words); "ww 中" -> ▁ w w ▁ 中(<unk>) (5 tokens, 2 words)
    assert tok.tokenize("ww 中") == ["▁", "w", "w", "▁", "中"]
    assert tok.convert_tokens_to_ids("中") == 3
    pairs = [("en", "wake me up"), ("en", "ww 中"), ("de", "hallo"), ("de", "  "), ("de", "<mask> hallo")]
    stats = tokenizer_stats(tok, pairs)
    assert list(stats) == ["en", "de"]
    en, de = stats["en"], stats["de"]
    assert en["n_words"] == 5 and en["n_tokens"] == 8 and en["n_lines"] == 2
    assert en["split_ratio"] == pytest.approx(8 / 5)
    assert en["unk_portion"] == pytest.approx(1 / 8)
    # "<mask> hallo": the special token is not counted as a sub-token, but its word is
    assert de["n_words"] == 3 and de["n_tokens"] == 2 and de["unk_portion"] == 0.0
    with pytest.raises(AtmError, match="item 0"):
        tokenizer_stats(tok, ["just a string"])


def test_stats_on_trained_tokenizer(tok, held_out):
    pairs = [("en-US", t) for t in held_out[:300]] + [("de-DE", t) for t in held_out[300:]] + [("zh-CN", "我想听音乐")]
    stats = tokenizer_stats(tok, pairs)
    assert set(stats) == {"en-US", "de-DE", "zh-CN"}
    assert 1.0 <= stats["en-US"]["split_ratio"] < stats["de-DE"]["split_ratio"]  # in-domain English splits least
    assert stats["en-US"]["unk_portion"] < 0.01
    assert stats["zh-CN"]["unk_portion"] > 0.0


def test_check_compatible(tok):
    from transformers import RobertaPreLayerNormConfig

    check_compatible(tok, RobertaPreLayerNormConfig(vocab_size=VOCAB, pad_token_id=1))
    with pytest.raises(AtmError, match=rf"{VOCAB} tokens.*vocab_size=1234"):
        check_compatible(tok, RobertaPreLayerNormConfig(vocab_size=1234))
    with pytest.raises(AtmError, match="pad_token_id"):
        check_compatible(tok, {"vocab_size": VOCAB, "pad_token_id": 0})
