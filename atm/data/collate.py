"""Tokenized datasets, MLM masking and batch streams shared by every stage.

MLM training text is tokenized once (:func:`tokenize_corpus`) into one flat token array plus line offsets
(the layout of Megatron-LM's indexed datasets and nanoGPT's ``.bin`` shards, so memory-mapped token shards
can replace it), then served either as packed blocks of ``max_seq_len`` tokens (:class:`PackedBlocks`,
RoBERTa's FULL-SENTENCES, no padding) or one example per line (:class:`LineExamples`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


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


class TokenizedCorpus(NamedTuple):
    """Lines tokenized once: line ``i`` is ``ids[offsets[i]:offsets[i + 1]]`` (sub-token ids, no ``<s>``/``</s>``).

    Attributes:
        ids: int32 ``[n_tokens]``, every line's tokens back to back.
        offsets: int64 ``[n_lines + 1]``, ``offsets[0] = 0``, ``offsets[-1] = n_tokens``.
    """

    ids: np.ndarray
    offsets: np.ndarray

    @property
    def n_lines(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])


def tokenize_corpus(tokenizer, lines: Iterable[str], *, chunk_size: int = 8192, desc: str | None = None,
                    total: int | None = None) -> TokenizedCorpus:
    """Tokenize ``lines`` once, ``chunk_size`` lines at a time, into a :class:`TokenizedCorpus`.

    Lines are streamed: only one chunk's Python token lists exist at a time, the rest is int32 NumPy.
    Lines without any sub-token (blank) are dropped; no line is truncated (:class:`LineExamples` and
    :class:`PackedBlocks` cut to ``max_seq_len``). With ``desc`` a tqdm bar counts the lines.
    """
    ids: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    if total is None and isinstance(lines, Sequence):
        total = len(lines)
    iterator = iter(lines)
    with tqdm(total=total, desc=desc, unit="lines", disable=desc is None, mininterval=2.0) as bar:
        while chunk := list(itertools.islice(iterator, chunk_size)):
            encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            n = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
            ids.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(n.sum())))
            lengths.append(n[n > 0])
            bar.update(len(chunk))
    flat = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    n_tokens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    return TokenizedCorpus(flat, np.concatenate([[0], np.cumsum(n_tokens)]).astype(np.int64))


class LineExamples(Sequence):
    """One MLM example per line of a :class:`TokenizedCorpus`: ``<s>`` + its first ``max_seq_len - 2``
    sub-tokens + ``</s>`` (what :func:`tokenize_lines` gives, without tokenizing again); batches are
    padded by the collator."""

    def __init__(self, corpus: TokenizedCorpus, max_seq_len: int, bos_id: int, eos_id: int):
        if max_seq_len < 3:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room for a token between <s> and </s>")
        self.corpus, self.keep, self.bos, self.eos = corpus, max_seq_len - 2, bos_id, eos_id

    def __len__(self) -> int:
        return self.corpus.n_lines

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        start, end = self.corpus.offsets[i], self.corpus.offsets[i + 1]
        body = self.corpus.ids[start:min(end, start + self.keep)].tolist()
        return {"input_ids": [self.bos, *body, self.eos]}


class PackedBlocks(Sequence):
    """Lines packed into blocks of exactly ``max_seq_len`` tokens, no padding (RoBERTa's FULL-SENTENCES, Liu
    et al. 2019 sec. 4.2; Cramming, Geiping & Goldstein 2022 sec. 4.1).

    The lines are concatenated, each followed by ``</s>`` as separator, and the stream is cut into pieces
    of ``max_seq_len - 1`` tokens; block ``k`` is ``<s>`` + piece ``k``. A line may continue into the next
    block; attention crosses line boundaries inside a block. The last incomplete piece is dropped, unless
    the corpus is shorter than one block (then it is the only, shorter, block). ``len(corpus.ids) +
    n_lines`` stream tokens give ``(n_tokens + n_lines) // (max_seq_len - 1)`` blocks.
    """

    def __init__(self, corpus: TokenizedCorpus, max_seq_len: int, bos_id: int, eos_id: int):
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len} leaves no room for a token after <s>")
        n = corpus.n_lines
        stream = np.empty(corpus.n_tokens + n, dtype=np.int32)
        separators = corpus.offsets[1:] + np.arange(n)  # line i's </s> follows its tokens, shifted by i
        is_token = np.ones(len(stream), dtype=bool)
        is_token[separators] = False
        stream[is_token], stream[separators] = corpus.ids, eos_id
        self.stream, self.piece, self.bos = stream, max_seq_len - 1, bos_id
        self.n_blocks = max(len(stream) // self.piece, 1 if len(stream) else 0)

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
