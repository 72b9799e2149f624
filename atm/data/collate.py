"""Tokenized datasets, MLM masking and batch streams shared by every stage."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader


def tokenize_lines(tokenizer, lines: Sequence[str], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Tokenize each line into ``{"input_ids": [<s> ... </s>]}``, truncated to ``max_seq_len`` sub-tokens."""
    encoded = tokenizer(list(lines), truncation=True, max_length=max_seq_len)
    return [{"input_ids": ids} for ids in encoded["input_ids"] if len(ids) > 2]


def mlm_collator(tokenizer, mlm_probability: float = 0.15, seed: int | None = None) -> Callable:
    """The RoBERTa/BERT MLM collator of transformers: pads a batch and masks it.

    Of the non-special tokens, ``mlm_probability`` are selected; of those 80% become ``<mask>``, 10% a
    random token and 10% stay unchanged (Devlin et al. 2019, sec. 3.1; Liu et al. 2019). Returns batches
    ``input_ids[B,T]``, ``attention_mask[B,T]``, ``labels[B,T]`` (original id at selected positions,
    -100 elsewhere). With ``seed`` the masks are reproducible (used for evaluation perplexity).
    """
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability,
                                           mask_replace_prob=0.8, random_replace_prob=0.1, seed=seed)


def text_mlm_collator(tokenizer, max_seq_len: int, mlm_probability: float = 0.15,
                      seed: int | None = None) -> Callable:
    """Tokenize a batch of raw lines (truncated to ``max_seq_len``) and mask it with :func:`mlm_collator`.

    Training streams tokenize lazily, batch by batch, so a run never pays for lines it does not reach.
    """
    mask = mlm_collator(tokenizer, mlm_probability, seed)

    def collate(lines: Sequence[str]) -> dict:
        return mask(tokenize_lines(tokenizer, lines, max_seq_len))

    return collate


def batch_stream(examples: Sequence, batch_size: int, collate: Callable, seed: int) -> Iterator[dict]:
    """An endless stream of shuffled batches (a new seeded permutation every epoch)."""
    if not examples:
        raise ValueError("no training examples")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(examples, batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=generator, drop_last=len(examples) >= batch_size)
    while True:
        yield from loader


def batches(examples: Sequence, batch_size: int, collate: Callable) -> Iterator[dict]:
    """One pass over ``examples`` in order (for evaluation)."""
    return iter(DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate))
