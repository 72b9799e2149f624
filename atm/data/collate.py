"""Tokenized datasets, MLM masking and batch streams shared by every stage."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
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


class BatchStream:
    """An endless, resumable stream of shuffled batches: a new seeded permutation every epoch.

    The permutation of epoch ``e`` depends only on ``(seed, e)`` (NumPy ``SeedSequence``), so the position
    ``(epoch, offset)`` — :meth:`state_dict` — says exactly which batch comes next; :meth:`load_state_dict`
    continues there without collating (tokenizing, masking) the skipped batches. Randomness inside
    ``collate`` (MLM masking with the global torch RNG) is restored with the trainer's RNG state
    (:mod:`atm.engine.state`).

    Data parallelism: after :meth:`shard` each of ``world_size`` ranks draws the same global batch of
    ``batch_size * world_size`` examples and collates its own disjoint slice ``[rank * batch_size,
    (rank + 1) * batch_size)``; with ``world_size=1`` it is the whole batch. An epoch drops its last
    incomplete global batch, unless there are fewer examples than one global batch (then every epoch is
    one smaller batch).
    """

    def __init__(self, examples: Sequence, batch_size: int, collate: Callable, seed: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.collate, self.seed = examples, batch_size, collate, seed
        self.rank, self.world_size = 0, 1
        self.epoch, self.offset = 0, 0
        self._order: list[int] | None = None

    def shard(self, rank: int, world_size: int) -> BatchStream:
        """Read rank ``rank``'s slice of every global batch of ``world_size`` ranks (see the class doc).

        Raises:
            ValueError: fewer examples than ranks.
        """
        if len(self.examples) < world_size:
            raise ValueError(f"{len(self.examples)} training examples cannot be split over {world_size} ranks")
        self.rank, self.world_size = rank, world_size
        return self

    def _permutation(self, epoch: int) -> list[int]:
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(seed)).tolist()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        n, global_batch = len(self.examples), self.batch_size * self.world_size
        if self.offset + min(global_batch, n) > n:  # the rest of the epoch is smaller than a global batch
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._permutation(self.epoch)
        size = min(global_batch, n)
        indices = self._order[self.offset:self.offset + size]
        self.offset += size
        per_rank = -(-size // self.world_size)
        mine = indices[self.rank * per_rank:(self.rank + 1) * per_rank]
        return self.collate([self.examples[i] for i in mine])

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch: ``{"seed", "epoch", "offset", "world_size"}`` (plain ints)."""
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`. Raises ValueError when it belongs to another stream (seed or
        number of ranks differ)."""
        if int(state["seed"]) != self.seed or int(state["world_size"]) != self.world_size:
            raise ValueError(f"data position of a stream with seed {state['seed']} over {state['world_size']} "
                             f"ranks cannot continue one with seed {self.seed} over {self.world_size} ranks")
        self.epoch, self.offset, self._order = int(state["epoch"]), int(state["offset"]), None


def batch_stream(examples: Sequence, batch_size: int, collate: Callable, seed: int) -> BatchStream:
    """An endless stream of shuffled batches of ``batch_size`` (a :class:`BatchStream`)."""
    return BatchStream(examples, batch_size, collate, seed)


#: Batch size of forward-only scoring (perplexity, mask filling, XNLI accuracy).
EVAL_BATCH = 64


def batches(examples: Sequence, batch_size: int, collate: Callable) -> Iterator[dict]:
    """One pass over ``examples`` in order (for evaluation)."""
    return iter(DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate))
