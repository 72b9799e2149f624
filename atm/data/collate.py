"""Tokenized datasets, MLM masking and batch streams shared by every stage.

MLM training text is tokenized once into a token shard (:mod:`atm.data.shards`, memory-mapped), then served
either as packed blocks of ``max_seq_len`` tokens (:class:`PackedBlocks`, RoBERTa's FULL-SENTENCES, no padding)
or one example per line (:class:`LineExamples`). :class:`BatchStream` draws shuffled, resumable batches of them
through a ``torch.utils.data.DataLoader`` (worker processes and prefetch when asked for).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from atm.data.shards import TokenizedCorpus


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


class LineExamples(Sequence):
    """One MLM example per line of a :class:`~atm.data.shards.TokenizedCorpus`: ``<s>`` + its first
    ``max_seq_len - 2`` sub-tokens + ``</s>`` (what :func:`tokenize_lines` gives, without tokenizing again);
    batches are padded by the collator."""

    def __init__(self, corpus: TokenizedCorpus, max_seq_len: int, bos_id: int, eos_id: int):
        if max_seq_len < 3:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room for a token between <s> and </s>")
        self.corpus, self.keep, self.bos, self.eos = corpus, max_seq_len - 2, bos_id, eos_id

    def __len__(self) -> int:
        return self.corpus.n_lines

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return {"input_ids": [self.bos, *self.corpus.line(i)[:self.keep].tolist(), self.eos]}


class PackedBlocks(Sequence):
    """Lines packed into blocks of exactly ``max_seq_len`` tokens, no padding (RoBERTa's FULL-SENTENCES, Liu
    et al. 2019 sec. 4.2; Cramming, Geiping & Goldstein 2022 sec. 4.1).

    The corpus's token stream (each line followed by ``</s>``, :class:`~atm.data.shards.TokenizedCorpus`) is cut
    into pieces of ``max_seq_len - 1`` tokens; block ``k`` is ``<s>`` + piece ``k``, read from the (memory-mapped)
    stream when asked for, so blocks cost no memory. A line may continue into the next block; attention crosses
    line boundaries inside a block. The last incomplete piece is dropped, unless the corpus is shorter than one
    block (then it is the only, shorter, block): ``n_tokens + n_lines`` stream tokens give ``(n_tokens +
    n_lines) // (max_seq_len - 1)`` blocks.
    """

    def __init__(self, corpus: TokenizedCorpus, max_seq_len: int, bos_id: int, eos_id: int):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room for a token after <s>")
        if corpus.n_lines and int(corpus.tokens[-1]) != eos_id:
            raise ValueError(f"the corpus separates lines with id {int(corpus.tokens[-1])}, not </s> = {eos_id}")
        self.stream, self.piece, self.bos = corpus.tokens, max_seq_len - 1, bos_id
        self.n_blocks = max(len(self.stream) // self.piece, 1 if len(self.stream) else 0)

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, k: int) -> dict[str, list[int]]:
        if not 0 <= k < self.n_blocks:
            raise IndexError(k)
        return {"input_ids": [self.bos, *self.stream[k * self.piece:(k + 1) * self.piece].tolist()]}


def mlm_examples(corpus: TokenizedCorpus, tokenizer, max_seq_len: int, packing: bool) -> Sequence:
    """:class:`PackedBlocks` (``packing``) or :class:`LineExamples` of ``corpus`` with ``tokenizer``'s
    ``<s>``/``</s>`` ids."""
    kind = PackedBlocks if packing else LineExamples
    return kind(corpus, max_seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)


class BatchStream:
    """An endless, resumable stream of shuffled batches: a new seeded permutation every epoch.

    The permutation of epoch ``e`` depends only on ``(seed, e)`` (NumPy ``SeedSequence``), so the position
    ``(epoch, offset)`` — :meth:`state_dict` — says exactly which batch comes next; :meth:`load_state_dict`
    continues there without collating (tokenizing, masking) the skipped batches. ``collate`` runs with the
    torch RNG seeded from ``(seed, epoch, offset, rank)`` (and the caller's RNG state untouched), so a batch's
    random MLM mask depends only on its position: the same in a worker process as in this one, and again after a
    resume.

    Batches come through a ``torch.utils.data.DataLoader`` over batch positions (:meth:`batch_at`): with
    ``workers`` > 0 they are collated in that many worker processes, ``prefetch`` batches ahead per worker, in
    order; with 0 (the default) in this process.

    Data parallelism: after :meth:`shard` each of ``world_size`` ranks draws the same global batch of
    ``batch_size * world_size`` examples and collates its own disjoint slice ``[rank * batch_size,
    (rank + 1) * batch_size)``; with ``world_size=1`` it is the whole batch. An epoch drops its last
    incomplete global batch, unless there are fewer examples than one global batch (then every epoch is
    one smaller batch).
    """

    def __init__(self, examples: Sequence, batch_size: int, collate: Callable, seed: int, *, workers: int = 0,
                 prefetch: int = 2):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.collate, self.seed = examples, batch_size, collate, seed
        self.workers, self.prefetch = workers, prefetch
        self.rank, self.world_size = 0, 1
        self.epoch, self.offset = 0, 0
        self._orders: dict[int, Sequence[int]] = {}  # epoch -> permutation (the last two epochs asked for)
        self._batches: Iterator[dict] | None = None

    def shard(self, rank: int, world_size: int) -> BatchStream:
        """Read rank ``rank``'s slice of every global batch of ``world_size`` ranks (see the class doc).

        Raises:
            ValueError: fewer examples than ranks.
        """
        if len(self.examples) < world_size:
            raise ValueError(f"{len(self.examples)} training examples cannot be split over {world_size} ranks")
        self.rank, self.world_size, self._batches = rank, world_size, None
        return self

    def _permutation(self, epoch: int) -> Sequence[int]:
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(seed)).numpy()

    def _order(self, epoch: int) -> Sequence[int]:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = self._permutation(epoch)
        return self._orders[epoch]

    def _next_position(self, epoch: int, offset: int) -> tuple[int, int, int]:
        """``(epoch, start, next offset)`` of the batch after position ``(epoch, offset)``."""
        n = len(self.examples)
        size = min(self.batch_size * self.world_size, n)
        if offset + size > n:  # the rest of the epoch is smaller than a global batch
            epoch, offset = epoch + 1, 0
        return epoch, offset, offset + size

    def positions(self) -> Iterator[tuple[int, int]]:
        """``(epoch, start)`` of every batch from the current position on (endless)."""
        epoch, offset = self.epoch, self.offset
        while True:
            epoch, start, offset = self._next_position(epoch, offset)
            yield epoch, start

    def batch_at(self, epoch: int, start: int) -> dict:
        """This rank's batch of the global batch starting at ``start`` of epoch ``epoch``'s permutation, collated
        with the torch RNG seeded by its position."""
        size = min(self.batch_size * self.world_size, len(self.examples))
        indices = self._order(epoch)[start:start + size]
        per_rank = -(-size // self.world_size)
        mine = indices[self.rank * per_rank:(self.rank + 1) * per_rank]
        batch_seed = int(np.random.SeedSequence([self.seed, epoch, start, self.rank]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)
            return self.collate([self.examples[int(i)] for i in mine])

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            # a generator of its own: the loader draws its workers' base seed from it, not from the global RNG
            # (which dropout reads, and a resume restores)
            loader = DataLoader(_Positions(self), batch_size=None, sampler=_PositionSampler(self),
                                collate_fn=_as_is, num_workers=self.workers, worker_init_fn=_serial_tokenizers,
                                prefetch_factor=self.prefetch if self.workers else None,
                                generator=torch.Generator().manual_seed(self.seed))
            self._batches = iter(loader)
        batch = next(self._batches)
        self.epoch, _, self.offset = self._next_position(self.epoch, self.offset)
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later batch starts them again)."""
        self._batches = None

    def state_dict(self) -> dict[str, int]:
        """The position of the next batch: ``{"seed", "epoch", "offset", "world_size"}`` (plain ints)."""
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`. Raises ValueError when it belongs to another stream (seed or
        number of ranks differ)."""
        if int(state["seed"]) != self.seed or int(state["world_size"]) != self.world_size:
            raise ValueError(f"data position of a stream with seed {state['seed']} over {state['world_size']} "
                             f"ranks cannot continue one with seed {self.seed} over {self.world_size} ranks")
        self.epoch, self.offset, self._batches = int(state["epoch"]), int(state["offset"]), None


class _Positions(Dataset):
    """A map-style dataset whose items are a :class:`BatchStream`'s batches, keyed by ``(epoch, start)``."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __getitem__(self, position: tuple[int, int]) -> dict:
        return self.stream.batch_at(*position)


class _PositionSampler(Sampler):
    """The positions of a :class:`BatchStream`'s batches from where it stands (endless)."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.stream.positions()


def _as_is(batch: dict) -> dict:
    return batch


def _serial_tokenizers(_worker_id: int) -> None:
    """In a DataLoader worker: fast tokenizers run single-threaded (a forked process may not use the parent's Rust
    thread pool; saying so spares the warning of the ``tokenizers`` library)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def batch_stream(examples: Sequence, batch_size: int, collate: Callable, seed: int, *, workers: int = 0,
                 prefetch: int = 2) -> BatchStream:
    """An endless stream of shuffled batches of ``batch_size`` (a :class:`BatchStream`)."""
    return BatchStream(examples, batch_size, collate, seed, workers=workers, prefetch=prefetch)


#: Batch size of forward-only scoring (perplexity, mask filling, XNLI accuracy).
EVAL_BATCH = 64


def batches(examples: Sequence, batch_size: int, collate: Callable) -> Iterator[dict]:
    """One pass over ``examples`` in order (for evaluation)."""
    return iter(DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate))
