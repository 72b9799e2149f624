"""Whole-word mask filling: top-1, top-10 accuracy and mean reciprocal rank of masked words.

AlexaTM (FitzGerald et al. KDD 2022, sec. 4.2, "mask filling") masks one word of a sentence at a time and asks
the MLM to restore it; atm scores written nouns (UD PUD) and spoken slot words (MASSIVE). Top-1 accuracy of a
tiny or early model is often 0 everywhere; the rank of the right word still moves with training, so each
word also gets its rank (:func:`word_ranks`), from which top-k accuracy and the mean reciprocal rank (MRR,
Voorhees 1999, "The TREC-8 Question Answering Track Report") follow (:func:`rank_scores`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from atm import stats
from atm.data.collate import EVAL_BATCH
from atm.engine.loop import to_device
from atm.models.encoder import mlm_forward

#: A sentence to probe: its words and the indices of the words to mask, one at a time.
Probe = tuple[Sequence[str], Sequence[int]]
#: The k of the reported top-k accuracy (``.../noun_top10``, ``.../slot_top10``).
TOP_K = 10


def masked_items(tokenizer, probes: Sequence[Probe], max_seq_len: int) -> list[tuple[int, list[int], list[int], list[int]]]:
    """One masked copy per probed word: ``(item, input_ids, positions, gold ids)``.

    ``item`` counts the probed words of ``probes`` in order (sentence by sentence, word by word), whether or not
    they are scored, so it names the same word for every checkpoint and tokenizer. The word's sub-tokens (all
    of them) become ``<mask>`` at ``positions``; words that truncation to ``max_seq_len`` sub-tokens cuts off,
    wholly or in part, and words without sub-tokens are left out. Words are tokenized with
    ``is_split_into_words=True``.
    """
    items, item = [], 0
    for words, selected in probes:
        enc = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=max_seq_len)
        word_ids = enc.word_ids()
        whole = tokenizer(list(words), is_split_into_words=True).word_ids()
        for w in selected:
            positions = [i for i, wid in enumerate(word_ids) if wid == w]
            if positions and len(positions) == whole.count(w):
                ids = list(enc["input_ids"])
                gold = [ids[i] for i in positions]
                for i in positions:
                    ids[i] = tokenizer.mask_token_id
                items.append((item, ids, positions, gold))
            item += 1
    return items


def token_ranks(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Rank of the gold token in each row: ``1 + #{v: s_v > s_g} + #{v < g: s_v == s_g}``.

    The gold token's place in the vocabulary sorted by descending score, ties broken by the lower id first, as
    ``argmax`` does; so rank 1 <=> ``argmax == gold``. ``logits [N, V]``, ``gold [N]`` -> ``[N]`` (int64, >= 1).
    """
    score = logits.gather(1, gold[:, None])
    before = torch.arange(logits.shape[1], device=logits.device)[None, :] < gold[:, None]
    return 1 + (logits > score).sum(-1) + ((logits == score) & before).sum(-1)


@torch.no_grad()
def word_ranks(model, tokenizer, probes: Sequence[Probe], max_seq_len: int, batch_size: int = EVAL_BATCH
               ) -> tuple[np.ndarray, np.ndarray]:
    """Whole-word rank of every probed word (AlexaTM sec. 4.2 mask filling, ranked).

    For each probed word a copy of its sentence gets ``<mask>`` at ALL of the word's sub-tokens (the other
    words stay visible; :func:`masked_items`) and one forward pass scores the vocabulary at each masked
    position. The word's rank is the *maximum over its positions* of the gold sub-token's rank there
    (:func:`token_ranks`). So the word is in the top k exactly when the gold sub-token is among the k best at
    every one of its positions; rank 1 is today's top-1 criterion (the argmax is right at every position);
    its reciprocal rank is ``1 / rank``. Items are scored in length-sorted batches of ``batch_size``.

    Args:
        model: a masked LM (``*ForMaskedLM``; :func:`atm.models.encoder.mlm_forward`), in eval mode.
        probes: ``(words, indices of the words to mask)`` per sentence.

    Returns:
        ``(items [n], ranks [n])`` (int64) of the scored words, in item order (:func:`masked_items`);
        empty arrays when no word was scored.
    """
    items = masked_items(tokenizer, probes, max_seq_len)
    ranks = np.empty(len(items), dtype=np.int64)
    device = next(model.parameters()).device
    order = np.argsort([len(ids) for _, ids, _, _ in items], kind="stable")
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        padded = to_device(tokenizer.pad({"input_ids": [items[i][1] for i in chunk]}, return_tensors="pt"), device)
        masked = padded["input_ids"] == tokenizer.mask_token_id
        logits = mlm_forward(model, padded["input_ids"], padded["attention_mask"], masked)["logits"]
        # the masked positions in row-major order: each item's positions in turn
        gold = torch.tensor([g for i in chunk for g in items[i][3]], device=logits.device)
        per_token = iter(token_ranks(logits, gold).tolist())
        for i in chunk:
            ranks[i] = max(next(per_token) for _ in items[i][2])
    return np.asarray([item for item, _, _, _ in items], dtype=np.int64), ranks


def per_word_scores(ranks: np.ndarray, k: int = TOP_K) -> dict[str, np.ndarray]:
    """Each word's score ``[n]`` from its whole-word rank ``[n]``: ``accuracy`` (top-1: rank = 1),
    ``top<k>`` (rank <= k) as 0/1, ``mrr`` the reciprocal rank ``1 / rank``."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {"accuracy": (ranks == 1).astype(np.float64), f"top{k}": (ranks <= k).astype(np.float64),
            "mrr": 1.0 / ranks}


def rank_scores(ranks: np.ndarray, k: int = TOP_K, *, intervals: bool = False) -> dict[str, float]:
    """Means of :func:`per_word_scores` over words: ``accuracy`` (top-1), ``top<k>``, ``mrr`` (the mean
    reciprocal rank, Voorhees 1999), fractions; NaN when ``ranks`` is empty. With ``intervals`` each also gets
    ``<name>_lo``/``<name>_hi``, the 95% percentile bootstrap interval over words
    (:func:`atm.stats.bootstrap_interval`)."""
    out: dict[str, float] = {}
    for name, values in per_word_scores(ranks, k).items():
        out[name] = float(values.mean()) if values.size else float("nan")
        if intervals:
            interval = stats.bootstrap_interval(values) if values.size else None
            out[f"{name}_lo"] = interval.lo if interval else float("nan")
            out[f"{name}_hi"] = interval.hi if interval else float("nan")
    return out


def word_mask_fill(model, tokenizer, probes: Sequence[Probe], max_seq_len: int) -> float:
    """Top-1 whole-word mask-filling accuracy: the fraction of probed words of rank 1 (:func:`word_ranks`),
    i.e. whose argmax is the original sub-token at every masked position; NaN when no word was scored."""
    return rank_scores(word_ranks(model, tokenizer, probes, max_seq_len)[1])["accuracy"]
