"""Stage ``finetune``: joint intent classification + slot filling on MASSIVE (FitzGerald et al. 2022).

The ``encoder`` input (any atm MLM checkpoint) gets an intent head and a slot head
(:class:`~atm.models.heads.JointIntentSlotModel`: pooling ``finetune.pooling`` of hidden layer
``finetune.intent_layer``, slot labels on each word's first sub-token, loss ``intent_ce +
finetune.slot_loss_coef * slot_ce``), fine-tuned in full or over a frozen encoder (``finetune.freeze_encoder``).

Settings (``finetune.setting``, presets ``finetune=full`` and ``finetune=zero_shot``):

* ``full``: train on every locale of ``finetune.locales``; each evaluation locale must be one of them.
* ``zero_shot``: zero-shot cross-lingual transfer (MASSIVE sec. 5): train on ``finetune.locales`` (en-US),
  evaluate on other locales only.

Per evaluation locale it logs ``eval/massive/<locale>/{intent_accuracy, slot_f1, exact_match}`` and their
standard errors ``..._se`` = sqrt(p(1-p)/n), the means over locales ``eval/massive/avg/<score>``, writes the
predictions as ``predictions/<locale>.jsonl`` and the table ``evaluation/massive.{csv,md}``. With
``baseline=runs:/<finetune run id>`` (or ``baseline=finetune``: the finished finetune run lineage resolves with
``lineage.overrides.finetune``, never trained here), evaluated on the same locales, it also tags the run
``atm.baseline_run_id`` and logs the relative error-rate change against that run,
``compare/massive/<locale|avg>/<score>_rel_error_change`` = (err - err_baseline) / err_baseline with
err = 1 - score (negative = fewer errors; AlexaTM, FitzGerald et al. KDD 2022, Tables 4-6).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig

from atm import metrics as M
from atm import sweeps
from atm.data.collate import batch_stream
from atm.data.massive import MassiveExample, intent_labels, read_massive, slot_labels
from atm.engine.loop import device_for, fit, to_device
from atm.engine.state import run_state_dir
from atm.errors import AtmError
from atm.models import cost
from atm.models.encoder import load_mlm
from atm.models.heads import JointIntentSlotModel, align_word_labels, word_predictions
from atm.models.tokenizer import _check_special_ids, load_tokenizer
from atm.stages.common import log_model

log = logging.getLogger(__name__)

SCORES = ("intent_accuracy", "slot_f1", "exact_match")
SETTINGS = ("full", "zero_shot")
TAG_SETTING = "atm.finetune.setting"
TAG_FROZEN = "atm.finetune.freeze_encoder"
TAG_BASELINE = "atm.baseline_run_id"


def encode(tokenizer, examples, intents: list[str], slots: list[str], max_seq_len: int) -> list[dict]:
    """Tokenize MASSIVE examples: ``input_ids``, ``intent`` id, ``slot_labels`` on first sub-tokens (-100
    elsewhere) and the ``word_ids`` needed to read word-level predictions back."""
    intent_id = {name: i for i, name in enumerate(intents)}
    slot_id = {name: i for i, name in enumerate(slots)}
    out = []
    for ex in examples:
        enc = tokenizer(list(ex.words), is_split_into_words=True, truncation=True, max_length=max_seq_len)
        word_ids = enc.word_ids()
        out.append({"input_ids": enc["input_ids"], "word_ids": word_ids,
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


@torch.no_grad()
def predict(model, tokenizer, encoded: list[dict], intents: list[str], slots: list[str]):
    """Word-level predictions: ``(intent names, BIO tag sequences)``, one per example (tag sequences cover the
    words that survived truncation; :func:`score_locale` pads them with ``"O"``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pred_intents, pred_tags = [], []
    for start in range(0, len(encoded), 64):
        chunk = encoded[start:start + 64]
        batch = to_device(collator(tokenizer)(chunk), device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pred_intents += [intents[i] for i in out.intent_logits.argmax(-1).tolist()]
        token_pred = out.slot_logits.argmax(-1).tolist()
        for item, row in zip(chunk, token_pred):
            pred_tags.append([slots[i] for i in word_predictions(item["word_ids"], row[:len(item["word_ids"])])])
    model.train(was_training)
    return pred_intents, pred_tags


def score_predictions(pred_intents: Sequence[str], pred_tags: Sequence[Sequence[str]],
                      examples: Sequence[MassiveExample]) -> dict[str, float]:
    """MASSIVE's three scores of word-level predictions against ``examples``, with standard errors.

    Returns ``{intent_accuracy, slot_f1, exact_match}`` (fractions; slot F1 = seqeval micro-F1 over BIO
    spans, exact match = intent right and every slot tag right) and ``<score>_se`` = sqrt(p(1-p)/n) with
    n = number of utterances (MASSIVE, FitzGerald et al. 2022, sec. 5).

    Args:
        pred_intents: one intent name per utterance.
        pred_tags: one BIO tag per word of each utterance.
        examples: the gold utterances.

    Raises:
        AtmError: no examples, or mismatched lengths (see :mod:`atm.metrics`).
    """
    gold_intents = [ex.intent for ex in examples]
    gold_tags = [list(ex.slot_tags) for ex in examples]
    scores = {"intent_accuracy": M.intent_accuracy(pred_intents, gold_intents),
              "slot_f1": M.slot_f1(pred_tags, gold_tags),
              "exact_match": M.exact_match(pred_intents, gold_intents, pred_tags, gold_tags)}
    scores.update({f"{k}_se": M.standard_error(v, len(examples)) for k, v in list(scores.items())})
    return scores


def score_locale(model, tokenizer, examples, intents, slots, max_seq_len: int) -> tuple[dict, list[dict]]:
    """Intent accuracy, slot micro-F1 (seqeval) and exact match with standard errors, plus predictions."""
    encoded = encode(tokenizer, examples, intents, slots, max_seq_len)
    pred_intents, pred_tags = predict(model, tokenizer, encoded, intents, slots)
    # predictions for words cut off by truncation are "O"
    pred_tags = [p + ["O"] * (len(ex.slot_tags) - len(p)) for p, ex in zip(pred_tags, examples)]
    scores = score_predictions(pred_intents, pred_tags, examples)
    rows = [{"id": ex.id, "utt": ex.utt, "intent": ex.intent, "pred_intent": pi, "slots": list(ex.slot_tags),
             "pred_slots": pt} for ex, pi, pt in zip(examples, pred_intents, pred_tags)]
    return scores, rows


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


def train_examples(ft: DictConfig, seed: int) -> list:
    """The training sample: per locale of ``finetune.locales``, a seeded shuffle of its train partition cut
    to ``finetune.max_train_per_locale``.

    Raises:
        AtmError: ``finetune.locales`` names an unknown locale or one without train data, or the cap leaves
            no example.
    """
    train = []
    for examples in read_locales(list(ft.locales), "train", "finetune.locales").values():
        random.Random(seed).shuffle(examples)
        train += examples[:ft.max_train_per_locale]
    if not train:
        raise AtmError(f"finetune.max_train_per_locale={ft.max_train_per_locale}: no training example left")
    return train


def eval_examples(ft: DictConfig) -> dict[str, list[MassiveExample]]:
    """The ``finetune.eval_split`` utterances of every evaluation locale, at most ``finetune.max_eval_per_locale``
    of them: a fixed-seed uniform sample, in file order. MASSIVE's splits are parallel across locales (the same
    utterances, translated, in the same order), so every locale keeps the same utterances; the files are
    grouped by topic, so their first lines would not be a fair sample.

    Raises:
        AtmError: unknown locale, a locale without that split, or a cap that leaves no utterance.
    """
    cap = ft.max_eval_per_locale
    if cap is not None and cap < 1:
        raise AtmError(f"finetune.max_eval_per_locale={cap}: must be at least 1 (or null for all)")
    found = read_locales(list(ft.eval_locales), ft.eval_split, "finetune.eval_locales")
    out = {}
    for loc, items in found.items():
        keep = sorted(random.Random(0).sample(range(len(items)), cap)) if cap and cap < len(items) else None
        out[loc] = items if keep is None else [items[i] for i in keep]
    return out


def evaluate_massive(model, tokenizer, ft: DictConfig, intents: list[str], slots: list[str], max_seq_len: int,
                     prefix: str = "eval/massive", log_predictions: bool = True, *,
                     examples: dict[str, list[MassiveExample]] | None = None) -> dict[str, float]:
    """:func:`score_locale` on every locale of ``finetune.eval_locales`` (``finetune.eval_split``, at most
    ``max_eval_per_locale`` utterances, or the given ``examples`` by locale): ``<prefix>/<locale>/<score>``
    (and ``_se``) and the means over locales ``<prefix>/avg/<score>``; predictions are logged as
    ``predictions/<locale>.jsonl``."""
    if examples is None:
        examples = eval_examples(ft)
    results: dict[str, float] = {}
    for locale, items in examples.items():
        scores, rows = score_locale(model, tokenizer, items, intents, slots, max_seq_len)
        results.update({f"{prefix}/{locale}/{k}": v for k, v in scores.items()})
        results[f"{prefix}/{locale}/n"] = float(len(items))
        if log_predictions:
            mlflow.log_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                            f"predictions/{locale}.jsonl")
    for key in SCORES:
        results[f"{prefix}/avg/{key}"] = sum(results[f"{prefix}/{loc}/{key}"] for loc in examples) / len(examples)
    return results


# ------------------------------------------------------------------------------------ baseline


def baseline_run_id(ref: str) -> str:
    """The run id of ``baseline=runs:/<id>`` (or a bare run id).

    Raises:
        AtmError: an empty reference or one with a path after the id.
    """
    run_id = str(ref).removeprefix("runs:/").strip("/")
    if not run_id or "/" in run_id:
        raise AtmError(f"baseline={ref!r} must be a finetune run id, runs:/<run_id> or a stage name (finetune)")
    return run_id


def resolve_baseline(cfg: DictConfig, experiment_id: str) -> str:
    """The run id ``baseline`` names: ``runs:/<id>``/an id, or a stage (``finetune``) resolved by lineage
    (:func:`atm.lineage.resolve`: the finished run whose config hash matches that stage composed with the
    inherited overrides and ``lineage.overrides.<stage>``). A baseline is compared against, never trained.

    Raises:
        AtmError: a malformed reference, or no finished run of the named stage with that config hash.
    """
    from atm import lineage
    from atm.stages import STAGES

    ref = str(cfg.baseline)
    if ref.startswith("runs:/") or lineage.canonical_stage(ref) not in STAGES:
        return baseline_run_id(ref)

    def refuse(sub_cfg: DictConfig, inputs: dict, hash_: str) -> str:
        raise AtmError(f"baseline={ref}: no finished {sub_cfg.stage.name} run with config hash {hash_} (a baseline "
                       f"is never trained here: run it first, or give baseline=runs:/<run_id>)")

    return lineage.resolve("baseline", cfg, experiment_id, refuse).run_id


def baseline_scores(run_id: str, locales: Sequence[str]) -> dict[str, float]:
    """The baseline run's ``eval/massive/<locale>/<score>`` for every locale of ``locales`` and the average.

    Returns:
        ``{"<locale>/<score>": value, "avg/<score>": mean over locales}``.

    Raises:
        AtmError: no such run, or it was not evaluated on every one of ``locales`` (a comparison over
            different test sets would be meaningless).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        metrics = MlflowClient().get_run(run_id).data.metrics
    except MlflowException as err:
        raise AtmError(f"baseline=runs:/{run_id}: no such MLflow run ({str(err).splitlines()[0]})") from None
    evaluated = sorted({k.split("/")[2] for k in metrics if k.startswith("eval/massive/") and k.count("/") == 3}
                       - {"avg"})
    missing = [loc for loc in locales if any(f"eval/massive/{loc}/{s}" not in metrics for s in SCORES)]
    if missing:
        raise AtmError(f"baseline=runs:/{run_id} was not evaluated on MASSIVE locale(s) {', '.join(missing)} "
                       f"(it has: {', '.join(evaluated) or 'none'}); compare runs evaluated on the same locales")
    out = {f"{loc}/{s}": metrics[f"eval/massive/{loc}/{s}"] for loc in locales for s in SCORES}
    out.update({f"avg/{s}": sum(out[f"{loc}/{s}"] for loc in locales) / len(locales) for s in SCORES})
    return out


def relative_error_changes(results: dict[str, float], baseline: dict[str, float],
                           prefix: str = "eval/massive") -> dict[str, float]:
    """``compare/massive/<locale|avg>/<score>_rel_error_change`` = (err - err_b) / err_b with err = 1 - score
    (:func:`atm.metrics.relative_error_change`; negative = better than the baseline). The average compares
    the errors of the locale-averaged scores. NaN where the baseline makes no error."""
    out = {}
    for key, base in baseline.items():
        ours = results[f"{prefix}/{key}"]
        name = f"compare/massive/{key}_rel_error_change"
        out[name] = M.relative_error_change(1.0 - ours, 1.0 - base) if base < 1.0 else math.nan
    return out


# --------------------------------------------------------------------------------------- tables


def log_table(rows: list[dict], artifact: str, floatfmt: str = ".4f") -> None:
    """Log ``rows`` as ``<artifact>.csv`` and a markdown ``<artifact>.md`` to the active MLflow run."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    mlflow.log_text(frame.to_csv(index=False), f"{artifact}.csv")
    cells = frame.astype(object).where(frame.notna(), None)  # integers stay integers, missing cells blank
    mlflow.log_text(cells.to_markdown(index=False, floatfmt=floatfmt, missingval="") + "\n", f"{artifact}.md")


def massive_table(results: dict[str, float], locales: Sequence[str], prefix: str = "eval/massive") -> list[dict]:
    """Rows ``locale, n, <score>, <score>_se[, <score>_rel_error_change]`` for each locale, then ``avg`` (the
    mean over locales; its ``n`` is the total number of utterances)."""
    rows = []
    for loc in [*locales, "avg"]:
        row: dict = {"locale": loc, "n": sum(int(results[f"{prefix}/{x}/n"]) for x in locales) if loc == "avg"
                     else int(results[f"{prefix}/{loc}/n"])}
        for s in SCORES:
            row[s] = results[f"{prefix}/{loc}/{s}"]
            if loc != "avg":
                row[f"{s}_se"] = results[f"{prefix}/{loc}/{s}_se"]
            change = results.get(f"compare/massive/{loc}/{s}_rel_error_change")
            if change is not None:
                row[f"{s}_rel_error_change"] = change
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- stage


def check(cfg: DictConfig) -> None:
    """Config-time validation of the ``finetune`` group (before any input is trained).

    Raises:
        AtmError: naming the key: an unknown ``setting``, empty locale lists, evaluation locales that
            contradict the setting, or a malformed ``baseline`` reference.
    """
    ft = cfg.finetune
    if ft.setting not in SETTINGS:
        raise AtmError(f"finetune.setting={ft.setting!r} must be one of {', '.join(SETTINGS)}")
    for key in ("locales", "eval_locales"):
        if not ft[key]:
            raise AtmError(f"finetune.{key} is empty; name at least one MASSIVE locale")
    train, test = list(ft.locales), list(ft.eval_locales)
    if ft.setting == "full" and (extra := [loc for loc in test if loc not in train]):
        raise AtmError(f"finetune.setting=full: evaluation locale(s) {', '.join(extra)} not in finetune.locales "
                       f"({', '.join(train)}); use finetune=zero_shot to test locales the model was not trained on")
    if ft.setting == "zero_shot" and (seen := [loc for loc in test if loc in train]):
        raise AtmError(f"finetune.setting=zero_shot: evaluation locale(s) {', '.join(seen)} are also training "
                       f"locales (finetune.locales={', '.join(train)})")
    ref = str(cfg.get("baseline") or "")
    if ref:
        from atm.lineage import canonical_stage
        from atm.stages import STAGES

        stage = canonical_stage(ref)
        if stage in STAGES and stage not in ("finetune", "distill_task"):
            raise AtmError(f"baseline={ref}: a {stage} run has no MASSIVE scores; name a finetune run "
                           f"(baseline=finetune or runs:/<run_id>)")
        if stage not in STAGES:
            baseline_run_id(ref)


def load_encoder(path: Path):
    """``(MLM model, tokenizer)`` of a checkpoint directory, checked against each other: the tokenizer's size
    is the model's vocabulary (:func:`atm.models.encoder.load_mlm`), its special tokens have atm's fixed ids,
    and its ``<s>``/``<pad>``/``</s>`` ids are those in the model's config.

    Raises:
        AtmError: naming ``path``: not an MLM checkpoint, no tokenizer, or a tokenizer of another model.
    """
    tokenizer = load_tokenizer(path)
    model = load_mlm(path)
    _check_special_ids(tokenizer, f"{path}: tokenizer/model mismatch")
    for attr in ("bos_token_id", "pad_token_id", "eos_token_id"):
        want = getattr(model.config, attr, None)
        if want is not None and getattr(tokenizer, attr) != want:
            raise AtmError(f"{path}: tokenizer/model mismatch: tokenizer {attr}={getattr(tokenizer, attr)} but "
                           f"the model's config has {attr}={want}")
    return model, tokenizer


def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Fine-tune on ``finetune.locales`` (train partition), evaluate ``finetune.eval_locales``."""
    ft = cfg.finetune
    path = inputs["encoder"].path
    mlflow.set_tags({TAG_SETTING: ft.setting, TAG_FROZEN: str(bool(ft.freeze_encoder)).lower()})
    baseline = None
    if cfg.get("baseline"):
        baseline_id = resolve_baseline(cfg, mlflow.active_run().info.experiment_id)
        mlflow.set_tag(TAG_BASELINE, baseline_id)
        baseline = baseline_scores(baseline_id, list(ft.eval_locales))
    encoder, tokenizer = load_encoder(path)
    test = eval_examples(ft)  # fails on a locale without data before anything is trained
    train = train_examples(ft, cfg.seed)
    mlflow.log_metric("data/train_examples", len(train))
    intents, slots = intent_labels(), slot_labels()
    model = JointIntentSlotModel.from_encoder(encoder, intents, slots, pooling=ft.pooling,
                                              intent_layer=ft.intent_layer,
                                              slot_loss_coef=ft.slot_loss_coef, freeze_encoder=ft.freeze_encoder)
    del encoder
    model.to(device_for(cfg.trainer))
    stream = batch_stream(encode(tokenizer, train, intents, slots, cfg.data.max_seq_len),
                          cfg.trainer.batch_size, collator(tokenizer), cfg.seed)
    pruning = sweeps.pruning_callbacks(cfg, model, lambda: evaluate_massive(
        model, tokenizer, ft, intents, slots, cfg.data.max_seq_len, log_predictions=False, examples=test))
    summary = fit(model, stream, lambda batch, step: (model(**batch).loss, {}), cfg.trainer, desc="finetune",
                  callbacks=pruning, state_dir=run_state_dir(cfg.trainer))
    results = evaluate_massive(model, tokenizer, ft, intents, slots, cfg.data.max_seq_len, examples=test)
    if baseline is not None:
        results.update(relative_error_changes(results, baseline))
    mlflow.log_metrics(results, step=cfg.trainer.max_steps)
    log_table(massive_table(results, list(test)), "evaluation/massive")
    log_model(model, tokenizer, "checkpoint")
    return {**summary, **results, **cost.measure(model, tokenizer, cfg)}
