"""Evaluation metrics: perplexity, intent accuracy, slot F1, exact match, mask filling, error bars.

Pure functions over plain Python sequences (torch is only imported by :func:`masked_lm_nll`).
Every function validates its inputs and raises :class:`atm.errors.AtmError` with a one-line
message naming the argument at fault (e.g. mismatched lengths) instead of returning a silently
wrong number.

Sources:

* Perplexity, mask filling, XNLI-as-proxy: FitzGerald et al., "Alexa Teacher Model", KDD 2022.
* Intent accuracy, slot micro-F1 (seqeval over BIO tags), exact-match accuracy and their standard errors:
  FitzGerald et al., "MASSIVE: A 1M-Example Multilingual Natural Language Understanding Dataset", 2022, as
  its official scorer computes them (``eval_preds`` in ``src/massive/utils/training_utils.py`` of
  github.com/alexa/massive): exact match compares per-word slot *types* (:func:`exact_match`), and the
  slot-F1 standard error counts words (:func:`slot_f1_standard_error`).
* Relative error change (negative = better than the baseline): Soltan et al., "AlexaTM 20B", 2022,
  and the ATM paper's result tables.

All accuracies / F1 scores are fractions in ``[0, 1]`` (not percentages).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from atm.errors import AtmError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "MASSIVE_EXAMPLE_COLUMNS",
    "exact_match",
    "intent_accuracy",
    "mask_fill_accuracy",
    "massive_example_scores",
    "masked_lm_nll",
    "perplexity",
    "relative_error_change",
    "slot_f1",
    "slot_f1_standard_error",
    "slot_precision_recall_f1",
    "slot_types",
    "standard_error",
    "to_bio",
]

IGNORE_INDEX = -100
"""Label id ignored by :func:`masked_lm_nll` and :func:`mask_fill_accuracy` (PyTorch convention)."""


# --------------------------------------------------------------------------------------------
# helpers


def _as_list(values: Any, name: str) -> list:
    """Return ``values`` as a list (accepts sequences, numpy arrays and torch tensors)."""
    if isinstance(values, (str, bytes)):
        raise AtmError(f"{name} must be a sequence of labels, got a single string {values[:40]!r}")
    if hasattr(values, "tolist"):  # numpy array / torch tensor
        values = values.tolist()
    try:
        return list(values)
    except TypeError:
        raise AtmError(f"{name} must be a sequence, got {type(values).__name__}") from None


def _check_same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise AtmError(f"length mismatch: {name_a} has {len(a)} items but {name_b} has {len(b)}")


def _check_nonempty(values: Sequence, name: str) -> None:
    if len(values) == 0:
        raise AtmError(f"{name} is empty; the metric is undefined for zero examples")


def _check_tag_sequences(pred_tags: Any, gold_tags: Any) -> tuple[list[list[str]], list[list[str]]]:
    """Validate two lists of per-utterance BIO tag sequences; return them as lists of lists."""
    pred = _as_list(pred_tags, "pred_tags")
    gold = _as_list(gold_tags, "gold_tags")
    _check_same_length(pred, gold, "pred_tags", "gold_tags")
    out_pred, out_gold = [], []
    for i, (p, g) in enumerate(zip(pred, gold)):
        p = _as_list(p, f"pred_tags[{i}]")
        g = _as_list(g, f"gold_tags[{i}]")
        _check_same_length(p, g, f"pred_tags[{i}]", f"gold_tags[{i}]")
        for name, seq in ((f"pred_tags[{i}]", p), (f"gold_tags[{i}]", g)):
            for j, tag in enumerate(seq):
                if not isinstance(tag, str):
                    raise AtmError(f"{name}[{j}] must be a BIO tag string, got {tag!r}")
        out_pred.append(p)
        out_gold.append(g)
    return out_pred, out_gold


def _positive_int(value: Any, name: str, what: str) -> int:
    try:
        as_int = int(value)
        ok = as_int == value and as_int > 0 and not isinstance(value, bool)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise AtmError(f"{name} must be a positive integer {what}, got {value!r}")
    return as_int


def _number(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise AtmError(f"{name} must be a number, got {value!r}") from None


def _check_fraction(value: float, name: str) -> float:
    value = _number(value, name)
    if not (0.0 <= value <= 1.0):
        raise AtmError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# language modelling


def perplexity(total_nll: float, n_tokens: int) -> float:
    """Token-level perplexity ``exp(total_nll / n_tokens)``.

    Args:
        total_nll: summed negative log-likelihood in nats (natural log) over all scored tokens,
            e.g. the first element returned by :func:`masked_lm_nll`, summed over batches.
        n_tokens: number of scored tokens (masked positions for an MLM), ``> 0``.

    Returns:
        Perplexity (``>= 1`` for a proper distribution); ``math.inf`` if it overflows a float.
    """
    n_tokens_i = _positive_int(n_tokens, "n_tokens", "(number of scored tokens)")
    total = _number(total_nll, "total_nll")
    if math.isnan(total) or total < 0:
        raise AtmError(f"total_nll must be a non-negative number of nats, got {total_nll!r}")
    try:
        return math.exp(total / n_tokens_i)
    except OverflowError:
        return math.inf


def masked_lm_nll(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[float, int]:
    """Summed token NLL (nats) and the number of scored tokens, for :func:`perplexity`.

    Args:
        logits: ``[B, T, V]`` (or ``[N, V]`` at selected positions) unnormalised scores (any float
            dtype; computed in float32).
        labels: ``[B, T]`` (or ``[N]``) integer target ids; positions equal to ``ignore_index`` (unmasked
            tokens, padding) are not scored.
        ignore_index: label value to skip (default ``-100``).

    Returns:
        ``(sum_nll, count)``: ``sum_nll`` is a Python float (sum over scored positions of
        ``-log softmax(logits)[label]``), ``count`` the number of scored positions.  Accumulate
        both over batches and call ``perplexity(sum_nll, count)`` once (averaging per-batch
        perplexities would weight batches wrongly).
    """
    import torch
    import torch.nn.functional as F

    if logits.dim() < 2 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise AtmError(
            f"labels must have shape {list(logits.shape[:-1])} (logits {list(logits.shape)} without V), "
            f"got {list(labels.shape)}"
        )
    labels = labels.long()
    scored = labels != ignore_index
    count = int(scored.sum().item())
    if count == 0:
        return 0.0, 0
    vocab = logits.shape[-1]
    bad = scored & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise AtmError(f"labels contain ids outside [0, {vocab}) that are not {ignore_index}")
    with torch.no_grad():
        nll = F.cross_entropy(
            logits.reshape(-1, vocab).float(),
            labels.reshape(-1),
            ignore_index=ignore_index,
            reduction="sum",
        )
    return float(nll.item()), count


def mask_fill_accuracy(
    pred_ids: Any, gold_ids: Any, ignore_index: int | None = IGNORE_INDEX
) -> float:
    """Top-1 mask-filling accuracy: fraction of scored positions where ``pred == gold``.

    Args:
        pred_ids: predicted token ids (argmax at each masked position), any shape, flattened.
        gold_ids: gold token ids, same number of elements; positions whose gold id equals
            ``ignore_index`` are skipped (pass ``None`` to score every position).

    Works on flat sequences, nested lists, numpy arrays or torch tensors.  Used for the ATM
    noun mask-filling probe (mask one noun at a time, score the argmax).  A *tuple* is one unit: pass
    each masked word as the tuple of its sub-token ids and the word counts as recovered only when every
    sub-token is.
    """
    pred = _flatten(_as_list(pred_ids, "pred_ids"))
    gold = _flatten(_as_list(gold_ids, "gold_ids"))
    _check_same_length(pred, gold, "pred_ids", "gold_ids")
    pairs = [(p, g) for p, g in zip(pred, gold) if ignore_index is None or g != ignore_index]
    if not pairs:
        raise AtmError(
            "mask_fill_accuracy: no scored positions (gold_ids empty or all ignore_index)"
        )
    return sum(p == g for p, g in pairs) / len(pairs)


def _flatten(values: list) -> list:
    out: list = []
    for v in values:
        if isinstance(v, list):
            out.extend(_flatten(list(v)))
        else:
            out.append(v)
    return out


# --------------------------------------------------------------------------------------------
# NLU (MASSIVE)


def to_bio(labels: Sequence[str], outside: str = "Other") -> list[str]:
    """MASSIVE's per-word slot labels -> BIO tags (``convert_to_bio`` of alexa/massive's training utils).

    The Hugging Face release of MASSIVE labels every word with its slot type, or ``outside`` (``"Other"``)
    for words outside any slot; a run of equal slot types is one span. ``["Other", "date", "date",
    "time"]`` -> ``["O", "B-date", "I-date", "B-time"]``.

    Args:
        labels: one label per word (may be empty).
        outside: the label of words outside every slot.

    Raises:
        AtmError: a label is not a string.
    """
    out: list[str] = []
    previous = outside
    for i, label in enumerate(_as_list(labels, "labels")):
        if not isinstance(label, str):
            raise AtmError(f"labels[{i}] must be a slot label string, got {label!r}")
        if label == outside:
            out.append("O")
        else:
            out.append(("I-" if label == previous else "B-") + label)
        previous = label
    return out


def intent_accuracy(pred: Sequence[str | int], gold: Sequence[str | int]) -> float:
    """Intent classification accuracy: fraction of utterances with ``pred[i] == gold[i]``.

    Args:
        pred, gold: one intent label (name or id) per utterance, same length, non-empty.
    """
    p = _as_list(pred, "pred")
    g = _as_list(gold, "gold")
    _check_same_length(p, g, "pred", "gold")
    _check_nonempty(g, "gold")
    return sum(a == b for a, b in zip(p, g)) / len(g)


def slot_precision_recall_f1(
    pred_tags: Sequence[Sequence[str]],
    gold_tags: Sequence[Sequence[str]],
    *,
    zero_division: int = 0,
    strict: bool = False,
    outside: str | None = None,
) -> tuple[float, float, float]:
    """Span-level micro precision, recall and F1 of BIO slot tags, computed by ``seqeval``.

    Args:
        pred_tags, gold_tags: one tag list per utterance (``"O"``, ``"B-date"``, ``"I-date"``...),
            same number of utterances and same length per utterance.
        zero_division: value returned when a ratio is 0/0 (e.g. no gold and no predicted spans
            at all); seqeval's own default ``"warn"`` also returns 0 but warns.
        strict: ``False`` (default, as MASSIVE) uses seqeval's conlleval-compatible mode in which
            a stray ``I-x`` opens a span; ``True`` uses strict IOB2 (``mode="strict"``).
        outside: ``None`` (default): the tags are BIO tags. A label name (MASSIVE: ``"Other"``): the
            tags are MASSIVE's per-word slot types with this label outside slots, converted by
            :func:`to_bio` first.

    Returns:
        ``(precision, recall, f1)`` as floats in ``[0, 1]``; a span counts as correct only if its
        type and both boundaries match.
    """
    from seqeval.metrics.sequence_labeling import precision_recall_fscore_support

    pred, gold = _check_tag_sequences(pred_tags, gold_tags)
    _check_nonempty(gold, "gold_tags")
    if outside is not None:
        pred, gold = [to_bio(t, outside) for t in pred], [to_bio(t, outside) for t in gold]
    kwargs: dict[str, Any] = {"average": "micro", "zero_division": zero_division}
    if strict:
        from seqeval.metrics import f1_score, precision_score, recall_score
        from seqeval.scheme import IOB2

        strict_kwargs = dict(kwargs, mode="strict", scheme=IOB2)
        return (
            float(precision_score(gold, pred, **strict_kwargs)),
            float(recall_score(gold, pred, **strict_kwargs)),
            float(f1_score(gold, pred, **strict_kwargs)),
        )
    p, r, f, _ = precision_recall_fscore_support(gold, pred, **kwargs)
    return float(p), float(r), float(f)


def slot_f1(pred_tags: Sequence[Sequence[str]], gold_tags: Sequence[Sequence[str]], **options: Any) -> float:
    """Slot-filling micro-F1 over BIO tags, ``seqeval.metrics.f1_score`` (MASSIVE's slot metric).

    ``options``: the keyword arguments of :func:`slot_precision_recall_f1` (``zero_division``, ``strict``,
    ``outside``); returns a float in ``[0, 1]``.
    """
    return slot_precision_recall_f1(pred_tags, gold_tags, **options)[2]


def slot_types(tags: Sequence[str]) -> list[str]:
    """Per-word slot types of a BIO tag sequence: ``"B-x"``/``"I-x"`` -> ``"x"``, ``"O"`` stays ``"O"``.

    The representation the official MASSIVE scorer compares for exact match (its labels are per-word slot
    types, ``"Other"`` outside slots): ``["B-time", "I-time", "O"]`` and ``["I-time", "I-time", "O"]`` both
    give ``["time", "time", "O"]``.
    """
    return [tag[2:] if tag[:2] in ("B-", "I-") else tag for tag in tags]


def _utterances(pred_intents, gold_intents, pred_tags, gold_tags) -> list[tuple[bool, bool, list, list]]:
    """Validated per-utterance ``(intent right, exact match, pred tags, gold tags)``; at least one utterance."""
    pi = _as_list(pred_intents, "pred_intents")
    gi = _as_list(gold_intents, "gold_intents")
    _check_same_length(pi, gi, "pred_intents", "gold_intents")
    pt, gt = _check_tag_sequences(pred_tags, gold_tags)
    _check_same_length(gi, gt, "gold_intents", "gold_tags")
    _check_nonempty(gi, "gold_intents")
    return [(a == b, a == b and slot_types(p) == slot_types(g), p, g) for a, b, p, g in zip(pi, gi, pt, gt)]


def exact_match(
    pred_intents: Sequence[str | int],
    gold_intents: Sequence[str | int],
    pred_tags: Sequence[Sequence[str]],
    gold_tags: Sequence[Sequence[str]],
) -> float:
    """Exact-match accuracy as the official MASSIVE scorer defines it: the fraction of utterances whose
    intent is right AND whose per-word slot types (:func:`slot_types`) all equal the gold ones.

    The official ``eval_preds`` (alexa/massive, ``src/massive/utils/training_utils.py``) labels each word
    with a slot type and compares the BIO sequences it derives from them (``convert_to_bio``), which is
    equivalent to comparing the types word for word. So a predicted ``I-x I-x`` for gold ``B-x I-x`` is an
    exact match (seqeval's lenient F1 reads the same span), while ``B-x O`` for ``B-x I-x`` is not. Two
    adjacent spans of one type (gold ``B-x B-x``) and one two-word span (``B-x I-x``) are the same types,
    so they match too: the official labels cannot tell them apart.

    Args:
        pred_intents, gold_intents: one intent per utterance.
        pred_tags, gold_tags: one BIO tag list per utterance, as for :func:`slot_f1`.

    Raises:
        AtmError: mismatched lengths, non-string tags, no utterance.
    """
    rows = _utterances(pred_intents, gold_intents, pred_tags, gold_tags)
    return sum(em for _, em, _, _ in rows) / len(rows)


#: Columns of :func:`massive_example_scores`, in order.
MASSIVE_EXAMPLE_COLUMNS = ("intent_correct", "exact_match", "slot_tp", "slot_fp", "slot_fn")


def massive_example_scores(
    pred_intents: Sequence[str | int],
    gold_intents: Sequence[str | int],
    pred_tags: Sequence[Sequence[str]],
    gold_tags: Sequence[Sequence[str]],
):
    """Per-utterance MASSIVE scores, from which every corpus score (and its bootstrap) is computed.

    Columns (:data:`MASSIVE_EXAMPLE_COLUMNS`): ``intent_correct`` (0/1), ``exact_match`` (0/1, the official
    definition of :func:`exact_match`), ``slot_tp``, ``slot_fp``, ``slot_fn``: the utterance's slot spans
    counted as seqeval counts them (``seqeval.metrics.sequence_labeling.get_entities``, lenient
    conlleval mode: a span is (type, start, end); true positive = predicted and gold, false positive =
    predicted only, false negative = gold only). Summed over utterances the counts give seqeval's micro
    F1 = 2 tp / (2 tp + fp + fn) exactly (seqeval separates sentences, so no span crosses utterances);
    column means give intent accuracy and exact match.

    Args:
        pred_intents, gold_intents: one intent per utterance.
        pred_tags, gold_tags: one BIO tag list per utterance, equal lengths per utterance.

    Returns:
        ``numpy.ndarray`` of shape ``(n_utterances, 5)``, dtype int64.

    Raises:
        AtmError: mismatched lengths, non-string tags, no utterance.
    """
    import numpy as np
    from seqeval.metrics.sequence_labeling import get_entities

    rows = []
    for intent_ok, em, p, g in _utterances(pred_intents, gold_intents, pred_tags, gold_tags):
        pred_spans, gold_spans = set(get_entities(p)), set(get_entities(g))
        tp = len(pred_spans & gold_spans)
        rows.append((int(intent_ok), int(em), tp, len(pred_spans) - tp, len(gold_spans) - tp))
    return np.asarray(rows, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# statistics


def standard_error(p: float, n: int) -> float:
    """Standard error of a proportion (binomial): ``sqrt(p * (1 - p) / n)``.

    Args:
        p: observed accuracy as a fraction in ``[0, 1]``.
        n: number of test examples, ``> 0``.

    Used for the ``±`` error bars of accuracies in the ATM / MASSIVE tables (a 95% interval is
    roughly ``p ± 1.96 * standard_error(p, n)``).
    """
    p = _check_fraction(p, "p")
    n_i = _positive_int(n, "n", "(number of examples)")
    return math.sqrt(p * (1.0 - p) / n_i)


def slot_f1_standard_error(f1: float, n_words: int) -> float:
    """Standard error of slot F1 as the official MASSIVE scorer reports it: ``sqrt(f1 (1 - f1) / n)`` with
    ``n`` the number of slot labels scored -- words, not utterances (``eval_preds`` in alexa/massive's
    ``training_utils.py``: ``total_slots = sum(len(x) for x in bio_slot_preds)``, the length of the per-word
    label sequences; its encoder path scores padded sub-token sequences, so there ``n`` also counts
    continuation sub-tokens and padding, which this function does not). A binomial approximation, as the
    scorer's own comment says; :func:`atm.stats.bootstrap_interval` with :func:`atm.stats.micro_f1` gives an
    interval that respects the span structure.

    Args:
        f1: slot micro-F1 as a fraction in ``[0, 1]``.
        n_words: number of scored words, ``> 0``.
    """
    return standard_error(f1, n_words)


def relative_error_change(err: float, err_baseline: float) -> float:
    """Relative change in error versus a baseline: ``(err - err_baseline) / err_baseline``.

    Args:
        err: error of the system under test (e.g. ``1 - accuracy`` or ``1 - F1``), ``>= 0``.
        err_baseline: error of the baseline, ``> 0``.

    Returns:
        A signed fraction; negative means fewer errors than the baseline (``-0.1`` = 10%
        relative error reduction), as reported in the AlexaTM / ATM papers.
    """
    err = _number(err, "err")
    base = _number(err_baseline, "err_baseline")
    if math.isnan(err) or err < 0:
        raise AtmError(f"err must be a non-negative error, got {err!r}")
    if math.isnan(base) or base < 0:
        raise AtmError(f"err_baseline must be a non-negative error, got {base!r}")
    if base == 0:
        raise AtmError(
            "err_baseline is 0; relative error change is undefined for a perfect baseline"
        )
    return (err - base) / base
