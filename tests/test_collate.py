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
