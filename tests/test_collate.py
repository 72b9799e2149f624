"""MLM masking proportions (RoBERTa: 15% selected; 80% <mask>, 10% random, 10% unchanged) and batching."""

import torch
from transformers import XLMRobertaTokenizer

from atm.data.collate import batch_stream, mlm_collator, tokenize_lines

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _tokenizer():
    words = [f"▁w{i}" for i in range(500)]
    return XLMRobertaTokenizer(vocab=[(p, 0.0) for p in SPECIALS] + [(w, -1.0) for w in words])


def test_masking_proportions():
    tok = _tokenizer()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, 500, (int(n),), generator=g))
             for n in torch.randint(5, 40, (600,), generator=g)]
    examples = tokenize_lines(tok, lines, max_seq_len=64)
    batch = mlm_collator(tok, 0.15, seed=1)(examples)
    original = tok.pad({"input_ids": [e["input_ids"] for e in examples]}, return_tensors="pt")["input_ids"]
    special = (original < len(SPECIALS))
    selected = batch["labels"] != -100
    assert not (selected & special).any()  # <s>, </s>, <pad> are never selected
    assert torch.equal(batch["labels"][selected], original[selected])
    n_real = (~special).sum().item()
    assert abs(selected.sum().item() / n_real - 0.15) < 0.01
    ids = batch["input_ids"][selected]
    orig = original[selected]
    masked = (ids == tok.mask_token_id).float().mean().item()
    unchanged = (ids == orig).float().mean().item()
    randomised = 1 - masked - unchanged
    assert abs(masked - 0.8) < 0.03
    # a random replacement may draw the original token (1/V); both shares are about 10%
    assert abs(unchanged - 0.1) < 0.025 and abs(randomised - 0.1) < 0.025
    assert torch.equal(batch["input_ids"][~selected], original[~selected])
    # seeded masks are reproducible (evaluation perplexity relies on it)
    again = mlm_collator(tok, 0.15, seed=1)(examples)
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_tokenize_truncates_and_batch_stream_cycles():
    tok = _tokenizer()
    examples = tokenize_lines(tok, ["w1 w2 w3 w4 w5 w6", "w7", ""], max_seq_len=4)
    assert [len(e["input_ids"]) for e in examples] == [4, 3]  # empty line dropped; <s> ... </s> kept
    assert examples[0]["input_ids"][0] == tok.bos_token_id and examples[0]["input_ids"][-1] == tok.eos_token_id
    stream = batch_stream(examples, 1, mlm_collator(tok), seed=0)
    seen = [next(stream)["input_ids"].shape[1] for _ in range(6)]
    assert sorted(seen) == [3, 3, 3, 4, 4, 4]  # three epochs of two examples


# ------------------------------------------------------------------------------ tokenized once, packing

from atm.data.collate import BatchStream, LineExamples, PackedBlocks  # noqa: E402
from atm.data.shards import tokenize_corpus  # noqa: E402


def _ids(tok, words: str) -> list[int]:
    return tok.convert_tokens_to_ids([f"▁{w}" for w in words.split()])


def test_line_examples_equal_tokenize_lines_without_tokenizing_again():
    tok = _tokenizer()
    lines = ["w1 w2 w3 w4 w5 w6", "w7", "", "w8 w9", "   "]
    corpus = tokenize_corpus(tok, lines, chunk_size=2)
    assert corpus.n_lines == 3 and corpus.n_tokens == 9  # blank lines dropped, nothing truncated
    # each line's tokens, then </s>: starts after 6 + 1, 1 + 1 and 2 + 1 stream tokens
    assert corpus.tokens.dtype.name == "uint16" and corpus.starts.tolist() == [0, 7, 9, 12]
    assert corpus.line(2).tolist() == _ids(tok, "w8 w9") and corpus.tokens[8] == tok.eos_token_id
    assert tokenize_corpus(tok, lines).tokens.tolist() == corpus.tokens.tolist()  # chunking changes nothing
    assert list(LineExamples(corpus, 4, tok.bos_token_id, tok.eos_token_id)) == tokenize_lines(tok, lines, 4)


def test_packed_blocks_golden_full_sentences():
    tok = _tokenizer()
    s, e = tok.bos_token_id, tok.eos_token_id
    corpus = tokenize_corpus(tok, ["w1 w2 w3", "w4", "", "w5 w6 w7 w8 w9"])
    blocks = PackedBlocks(corpus, 4, s, e)
    # stream: w1 w2 w3 </s> w4 </s> w5 w6 w7 w8 w9 </s> -> 4 pieces of 3, each after <s>
    assert [b["input_ids"] for b in blocks] == [
        [s, *_ids(tok, "w1 w2 w3")], [s, e, *_ids(tok, "w4"), e], [s, *_ids(tok, "w5 w6 w7")],
        [s, *_ids(tok, "w8 w9"), e]]
    # the incomplete tail is dropped; a corpus shorter than one block is one shorter block
    six = PackedBlocks(corpus, 6, s, e)
    assert len(six) == 2 and six[1]["input_ids"] == [s, e, *_ids(tok, "w5 w6 w7 w8")]
    (only,) = PackedBlocks(tokenize_corpus(tok, ["w1 w2"]), 8, s, e)
    assert only["input_ids"] == [s, *_ids(tok, "w1 w2"), e]


def test_packed_batches_have_no_padding_never_mask_separators_and_resume_exactly():
    tok = _tokenizer()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, 500, (int(n),), generator=g))
             for n in torch.randint(1, 30, (300,), generator=g)]
    corpus = tokenize_corpus(tok, lines)
    blocks = PackedBlocks(corpus, 32, tok.bos_token_id, tok.eos_token_id)
    assert len(blocks) == (corpus.n_tokens + corpus.n_lines) // 31
    collate = mlm_collator(tok, 0.15)
    stream = BatchStream(blocks, 8, collate, seed=5)
    for _ in range(3):
        next(stream)
    position, rng = stream.state_dict(), torch.get_rng_state()
    expected = [next(stream) for _ in range(40)]  # crosses an epoch boundary (len(blocks) // 8 batches)
    again = BatchStream(blocks, 8, collate, seed=5)
    again.load_state_dict(position)
    torch.set_rng_state(rng)
    for want in expected:
        got = next(again)
        assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "labels", "attention_mask"))
        assert got["input_ids"].shape == (8, 32) and bool(got["attention_mask"].all())
        special = torch.isin(torch.where(got["labels"] >= 0, got["labels"], got["input_ids"]),
                             torch.tensor([tok.bos_token_id, tok.eos_token_id]))
        assert not ((got["labels"] != -100) & special).any()
