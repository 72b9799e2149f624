"""MASSIVE intent classification + slot filling (FitzGerald et al. 2022): samples, tokenization, prediction, scores.

Shared by the stages that train or score a :class:`~atm.models.heads.JointIntentSlotModel` (``finetune``,
``distill_task``; ``evaluate`` reads locales through :func:`read_locales`).

Scores, as the official MASSIVE scorer defines them (``eval_preds`` in ``src/massive/utils/training_utils.py``
of github.com/alexa/massive; :mod:`atm.metrics`): intent accuracy; slot micro-F1 (seqeval over BIO spans);
exact match = intent right and every word's slot *type* right (:func:`atm.metrics.exact_match`); standard
errors sqrt(p(1-p)/n) with n = utterances, except slot F1, whose n is the number of words. Every corpus score
is computed from the per-utterance matrix of :func:`atm.metrics.massive_example_scores` (:func:`corpus_scores`),
so the logged scores and the per-example scores an analysis bootstraps cannot disagree.

Words without a sub-token: the tokenizer gives no token to a word that normalises to nothing (a lone
zero-width space U+200B or non-joiner U+200C: 3 words of the MASSIVE 1.1 test data, in my-MM and zh-CN) and
to the words cut off by truncation (``data.max_seq_len``). Such a word carries no slot label in training and
is predicted ``O`` (:func:`predict`); it is still scored against its gold tag. The official scorer, whose
labels live on sub-tokens, drops such words from both sequences instead; the two agree wherever the gold tag
is ``O``, as it is for every zero-width word of MASSIVE 1.1 (all partitions, all locales).

Inside an MLflow run, the examples each locale contributes are logged as the MLflow dataset
``massive/<partition>/<locale>`` (:func:`log_examples`; :mod:`atm.data.mlflow_datasets`): context ``training``
(train), ``evaluation`` (dev) or ``test`` (test), ``num_rows`` = the examples used, in file order.

Evaluation batches are sorted by length (:func:`predict`), so a batch pads to a similar length; an evaluation
set is tokenized once (:func:`eval_set`) and scored as often as needed (several seeds, a dev curve).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from atm import metrics as M
from atm.data.massive import MASSIVE_ARCHIVE, OUTSIDE, MassiveExample, read_massive
from atm.data.mlflow_datasets import examples_read, log_reads
from atm.engine.loop import to_device
from atm.errors import AtmError
from atm.models.heads import IGNORE_INDEX, align_word_labels, word_predictions
from atm.stats import micro_f1

#: The three MASSIVE scores, in table order.
SCORES = ("intent_accuracy", "slot_f1", "exact_match")
#: Columns of :func:`atm.metrics.massive_example_scores` each score is computed from.
SCORE_COLUMNS = {"intent_accuracy": [0], "slot_f1": [2, 3, 4], "exact_match": [1]}
#: Utterances per evaluation forward pass.
EVAL_BATCH_SIZE = 64
#: The MLflow dataset context of each MASSIVE partition (:func:`log_examples`).
CONTEXTS = {"train": "training", "dev": "evaluation", "test": "test"}


# ----------------------------------------------------------------------------------------- data


def read_locales(locales: Sequence[str], partition: str, key: str) -> dict[str, list[MassiveExample]]:
    """The ``partition`` examples of each locale (one pass over the archive), file order.

    Raises:
        AtmError: naming the config ``key``: an unknown locale, or a locale without ``partition`` data.
    """
    try:
        examples = read_massive(list(dict.fromkeys(locales)), [partition])
    except AtmError as err:
        raise AtmError(f"{key}: {err}") from None
    by_locale: dict[str, list[MassiveExample]] = {loc: [] for loc in locales}
    for ex in examples:
        by_locale[ex.locale].append(ex)
    for loc, items in by_locale.items():
        if not items:
            raise AtmError(f"{key}: MASSIVE locale {loc} has no {partition} data")
    return by_locale


def example_key(ex: MassiveExample) -> str:
    """The text of an example that its MLflow dataset digest covers: id, locale, partition, scenario, intent,
    utterance, words and slot tags."""
    return "\t".join((ex.id, ex.locale, ex.partition, ex.scenario, ex.intent, ex.utt, " ".join(ex.words),
                      " ".join(ex.slot_tags)))


def log_examples(by_locale: Mapping[str, Sequence[MassiveExample]], partition: str) -> None:
    """Log each locale's examples (in file order) as the MLflow dataset ``massive/<partition>/<locale>`` of the
    active run, context :data:`CONTEXTS` ``[partition]`` (nothing outside a run; once per run and content).

    Raises:
        KeyError: an unknown partition.
    """
    context = CONTEXTS[partition]
    log_reads(examples_read(f"massive/{partition}/{loc}", items, [MASSIVE_ARCHIVE], context, key=example_key)
              for loc, items in by_locale.items())


def train_examples(ft: DictConfig, seed: int) -> list:
    """The training sample: per locale of ``finetune.locales``, a seeded shuffle of its train partition cut
    to ``finetune.max_train_per_locale`` (null: all 11,514 of a locale). Logged per locale (in file order) as
    the MLflow dataset ``massive/train/<locale>`` (:func:`log_examples`).

    Raises:
        AtmError: ``finetune.locales`` names an unknown locale or one without train data, or the cap leaves
            no example.
    """
    train, used = [], {}
    for loc, examples in read_locales(list(ft.locales), "train", "finetune.locales").items():
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)  # the permutation shuffling the examples themselves would make
        chosen = order[:ft.max_train_per_locale]
        train += [examples[i] for i in chosen]
        used[loc] = [examples[i] for i in sorted(chosen)]
    if not train:
        raise AtmError(f"finetune.max_train_per_locale={ft.max_train_per_locale}: no training example left")
    log_examples(used, "train")
    return train


def sample_locales(locales: Sequence[str], partition: str, cap: int | None, cap_key: str,
                   locales_key: str) -> dict[str, list[MassiveExample]]:
    """At most ``cap`` utterances of ``partition`` per locale (null: all): a fixed-seed uniform sample, in file
    order. MASSIVE's splits are parallel across locales (the same utterances, translated, in the same order),
    so every locale keeps the same utterances; the files are grouped by topic, so their first lines would not
    be a fair sample. Logged per locale as the MLflow dataset ``massive/<partition>/<locale>``
    (:func:`log_examples`).

    Raises:
        AtmError: naming ``cap_key`` (a cap below 1) or ``locales_key`` (an unknown locale, or a locale without
            that split).
    """
    if cap is not None and cap < 1:
        raise AtmError(f"{cap_key}={cap}: must be at least 1 (or null for all)")
    out = {}
    for loc, items in read_locales(list(locales), partition, locales_key).items():
        keep = sorted(random.Random(0).sample(range(len(items)), cap)) if cap and cap < len(items) else None
        out[loc] = items if keep is None else [items[i] for i in keep]
    log_examples(out, partition)
    return out


def eval_examples(ft: DictConfig) -> dict[str, list[MassiveExample]]:
    """The ``finetune.eval_split`` utterances of every locale of ``finetune.eval_locales``, at most
    ``finetune.max_eval_per_locale`` of them (null: all, 2,974 per locale for test), sampled by
    :func:`sample_locales`.

    Raises:
        AtmError: unknown locale, a locale without that split, or a cap that leaves no utterance.
    """
    return sample_locales(list(ft.eval_locales), ft.eval_split, ft.max_eval_per_locale,
                          "finetune.max_eval_per_locale", "finetune.eval_locales")


# ------------------------------------------------------------------------------------- encoding


def encode(tokenizer, examples, intents: list[str], slots: list[str], max_seq_len: int) -> list[dict]:
    """Tokenize MASSIVE examples (one batched call of the fast tokenizer per 1,000): ``input_ids``, ``intent``
    id, ``slot_labels`` on first sub-tokens (-100 elsewhere), the ``word_ids`` needed to read word-level
    predictions back and ``n_words`` (the utterance's words, including those without a token)."""
    intent_id = {name: i for i, name in enumerate(intents)}
    slot_id = {name: i for i, name in enumerate(slots)}
    out = []
    for start in range(0, len(examples), 1000):
        chunk = examples[start:start + 1000]
        enc = tokenizer([list(ex.words) for ex in chunk], is_split_into_words=True, truncation=True,
                        max_length=max_seq_len)
        for i, ex in enumerate(chunk):
            word_ids = enc.word_ids(i)
            out.append({"input_ids": enc["input_ids"][i], "word_ids": word_ids, "n_words": len(ex.words),
                        "intent": intent_id[ex.intent],
                        "slot_labels": align_word_labels(word_ids, [slot_id[t] for t in ex.slot_tags])})
    return out


def collator(tokenizer):
    """Pad a batch of :func:`encode` items: ``input_ids[B,T]``, ``attention_mask``, ``intent_labels[B]``,
    ``slot_labels[B,T]`` (-100 on padding)."""

    def collate(items):
        batch = tokenizer.pad({"input_ids": [x["input_ids"] for x in items]}, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        batch["intent_labels"] = torch.tensor([x["intent"] for x in items])
        batch["slot_labels"] = torch.tensor([x["slot_labels"] + [-100] * (width - len(x["slot_labels"]))
                                             for x in items])
        return batch

    return collate


@dataclass(frozen=True)
class EvalSet:
    """One locale's evaluation utterances, tokenized once (:func:`eval_set`).

    Attributes:
        examples: the gold utterances.
        encoded: their :func:`encode` items.
        n_words: the number of words of all utterances (the n of the slot-F1 standard error).
    """

    examples: list[MassiveExample]
    encoded: list[dict]
    n_words: int


def eval_set(tokenizer, examples: list[MassiveExample], intents: list[str], slots: list[str],
             max_seq_len: int) -> EvalSet:
    """:class:`EvalSet` of ``examples``."""
    return EvalSet(list(examples), encode(tokenizer, examples, intents, slots, max_seq_len),
                   sum(len(ex.words) for ex in examples))


# ----------------------------------------------------------------------------------- prediction


@torch.no_grad()
def predict(model, tokenizer, encoded: list[dict], intents: list[str], slots: list[str],
            batch_size: int = EVAL_BATCH_SIZE) -> tuple[list[str], list[list[str]]]:
    """Word-level predictions ``(intent names, BIO tag sequences)``, one per item, in input order.

    Batches are formed over the items sorted by length (each pads to its longest item). A word's tag is
    the slot prediction at its first sub-token; a word without a token (a lone zero-width space, or cut
    off by truncation) is predicted ``O``, so every sequence has the utterance's ``n_words`` tags.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collate = collator(tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    pred_intents: list[str] = [""] * len(encoded)
    pred_tags: list[list[str]] = [[] for _ in encoded]
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        chunk = [encoded[i] for i in index]
        batch = to_device(collate(chunk), device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        token_pred = out.slot_logits.argmax(-1).tolist()
        for i, item, intent, row in zip(index, chunk, out.intent_logits.argmax(-1).tolist(), token_pred):
            words = word_predictions(item["word_ids"], row[:len(item["word_ids"])], n_words=item["n_words"],
                                     fill=IGNORE_INDEX)
            pred_intents[i] = intents[intent]
            pred_tags[i] = [OUTSIDE if w == IGNORE_INDEX else slots[w] for w in words]
    model.train(was_training)
    return pred_intents, pred_tags


# --------------------------------------------------------------------------------------- scores


def example_scores(pred_intents: Sequence[str], pred_tags: Sequence[Sequence[str]],
                   examples: Sequence[MassiveExample]) -> np.ndarray:
    """:func:`atm.metrics.massive_example_scores` against the gold ``examples``: ``(n, 5)`` int64, columns
    :data:`atm.metrics.MASSIVE_EXAMPLE_COLUMNS`."""
    return M.massive_example_scores(pred_intents, [ex.intent for ex in examples], pred_tags,
                                    [list(ex.slot_tags) for ex in examples])


def score_value(scores: np.ndarray, score: str) -> float:
    """One corpus score of per-utterance scores ``(n, 5)``: intent accuracy and exact match are column
    means, slot F1 the micro F1 of the summed span counts (:func:`atm.stats.micro_f1`, = seqeval's)."""
    if score == "slot_f1":
        return float(micro_f1(scores[None, None, :, 2:5].astype(np.float64))[0])
    return float(scores[:, SCORE_COLUMNS[score][0]].mean())


def corpus_scores(scores: np.ndarray, n_words: int) -> dict[str, float]:
    """``{intent_accuracy, slot_f1, exact_match}`` of per-utterance scores ``(n, 5)`` and ``<score>_se`` =
    sqrt(p(1-p)/n) with n = utterances, or words for slot F1 (the official scorer's n; NaN without words).

    Raises:
        AtmError: no utterance.
    """
    if len(scores) == 0:
        raise AtmError("no MASSIVE utterance to score")
    out = {s: score_value(scores, s) for s in SCORES}
    return {**out, **standard_errors(out, len(scores), n_words)}


def standard_errors(scores: dict[str, float], n: int, n_words: int) -> dict[str, float]:
    """``<score>_se`` of ``{intent_accuracy, slot_f1, exact_match}``: sqrt(p(1-p)/n) with n = ``n`` utterances,
    or ``n_words`` words for slot F1 (:func:`atm.metrics.slot_f1_standard_error`; NaN without words)."""
    out = {f"{s}_se": M.standard_error(scores[s], n) for s in ("intent_accuracy", "exact_match")}
    out["slot_f1_se"] = M.slot_f1_standard_error(scores["slot_f1"], n_words) if n_words else float("nan")
    return out


def score_predictions(pred_intents: Sequence[str], pred_tags: Sequence[Sequence[str]],
                      examples: Sequence[MassiveExample]) -> dict[str, float]:
    """:func:`corpus_scores` of word-level predictions against ``examples`` (one intent and one BIO tag per
    word of each utterance).

    Raises:
        AtmError: no examples, or mismatched lengths (see :mod:`atm.metrics`).
    """
    return corpus_scores(example_scores(pred_intents, pred_tags, examples), sum(len(ex.words) for ex in examples))


def prediction_rows(examples: Sequence[MassiveExample], pred_intents: Sequence[str],
                    pred_tags: Sequence[Sequence[str]], seed: int | None) -> list[dict]:
    """The rows of ``predictions/<locale>.jsonl``: ``seed, id, utt, intent, pred_intent, slots, pred_slots``
    per utterance, in the given order (file order)."""
    return [{"seed": seed, "id": ex.id, "utt": ex.utt, "intent": ex.intent, "pred_intent": pi,
             "slots": list(ex.slot_tags), "pred_slots": list(pt)}
            for ex, pi, pt in zip(examples, pred_intents, pred_tags)]


def score_set(model, tokenizer, data: EvalSet, intents: list[str], slots: list[str]):
    """Predict ``data`` and score it: ``(per-utterance scores (n, 5), pred intents, pred tag sequences)``."""
    pred_intents, pred_tags = predict(model, tokenizer, data.encoded, intents, slots)
    return example_scores(pred_intents, pred_tags, data.examples), pred_intents, pred_tags


def log_prediction_rows(locale: str, rows: list[dict]) -> None:
    """Log :func:`prediction_rows` as the artifact ``predictions/<locale>.jsonl`` of the active MLflow run."""
    import json

    import mlflow

    mlflow.log_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), f"predictions/{locale}.jsonl")


def evaluate_sets(model, tokenizer, sets: dict[str, EvalSet], intents: list[str], slots: list[str],
                  prefix: str) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, list, list]]]:
    """Score one model on every locale of ``sets``.

    Returns:
        ``(results, outputs)``: results ``<prefix>/<locale>/<score>``, ``..._se`` and ``/n`` (utterances), and
        the means over locales ``<prefix>/avg/<score>``; outputs ``{locale: (per-utterance scores (n, 5),
        pred intents, pred tag sequences)}``.
    """
    results: dict[str, float] = {}
    outputs = {}
    for locale, data in sets.items():
        outputs[locale] = score_set(model, tokenizer, data, intents, slots)
        scores = corpus_scores(outputs[locale][0], data.n_words)
        results.update({f"{prefix}/{locale}/{k}": v for k, v in scores.items()})
        results[f"{prefix}/{locale}/n"] = float(len(data.examples))
    for key in SCORES:
        results[f"{prefix}/avg/{key}"] = float(np.mean([results[f"{prefix}/{loc}/{key}"] for loc in sets]))
    return results, outputs


def evaluate_massive(model, tokenizer, ft: DictConfig, intents: list[str], slots: list[str], max_seq_len: int,
                     prefix: str = "eval/massive", log_predictions: bool = True, *,
                     examples: dict[str, list[MassiveExample]] | None = None,
                     seed: int | None = None) -> dict[str, float]:
    """One model on every locale of ``finetune.eval_locales`` (``finetune.eval_split``, at most
    ``max_eval_per_locale`` utterances, or the given ``examples`` by locale): :func:`evaluate_sets`' results;
    with ``log_predictions`` the rows (:func:`prediction_rows`, ``seed`` = the model's training seed) are
    logged as ``predictions/<locale>.jsonl``."""
    if examples is None:
        examples = eval_examples(ft)
    sets = {loc: eval_set(tokenizer, items, intents, slots, max_seq_len) for loc, items in examples.items()}
    results, outputs = evaluate_sets(model, tokenizer, sets, intents, slots, prefix)
    if log_predictions:
        for loc, (_, pred_intents, pred_tags) in outputs.items():
            log_prediction_rows(loc, prediction_rows(sets[loc].examples, pred_intents, pred_tags, seed))
    return results
