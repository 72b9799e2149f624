"""Stage ``finetune``: joint intent classification + slot filling on MASSIVE (FitzGerald et al. 2022).

The ``encoder`` input (any atm MLM checkpoint) gets an intent head and a slot head
(:class:`~atm.models.heads.JointIntentSlotModel`: pooling ``finetune.pooling`` of hidden layer
``finetune.intent_layer``, slot labels on each word's first sub-token, loss ``intent_ce +
finetune.slot_loss_coef * slot_ce``), fine-tuned in full or over a frozen encoder (``finetune.freeze_encoder``).
Data, prediction and scoring live in :mod:`atm.tasks.massive`.

Settings (``finetune.setting``, presets ``finetune=full`` and ``finetune=zero_shot``):

* ``full``: train on every locale of ``finetune.locales``; each evaluation locale must be one of them.
* ``zero_shot``: zero-shot cross-lingual transfer (MASSIVE sec. 5): train on ``finetune.locales`` (en-US),
  evaluate on other locales only.

Seeds: one run trains one model per seed of ``finetune.seeds`` (default ``[${seed}]``) on the same training
sample (``seed`` picks it; tokenized once), each initialised (heads, dropout) and shuffled with its own seed,
and scores each on the same test utterances (tokenized once). Per evaluation locale it logs
``eval/massive/<locale>/{intent_accuracy, slot_f1, exact_match}`` = the mean over seeds, with

* ``<score>/seed_<s>``: the score of the seed-``s`` model;
* ``<score>_lo`` / ``<score>_hi``: a 95% interval, Student-t across seeds (:func:`atm.stats.seed_interval`) with
  several seeds, else the percentile bootstrap over test utterances (:func:`atm.stats.bootstrap_interval`;
  :func:`atm.stats.micro_f1` of the per-utterance span counts for slot F1);
* ``<score>_se`` = sqrt(p(1-p)/n) of the mean, n = utterances, or words for slot F1 (the official scorer's);

the means over locales ``eval/massive/avg/<score>`` (and ``/seed_<s>``; ``_lo``/``_hi`` across seeds when there
are several), the predictions of every seed as ``predictions/<locale>.jsonl``
(:func:`atm.tasks.massive.prediction_rows`: one row per seed and utterance, file order within a seed) and the
table ``evaluation/massive.{csv,md}``. The saved
``checkpoint`` is the first seed's model; ``train/...`` (and ``dev/massive/...``, ``finetune/best_step``) without a
seed suffix are its metrics, those of a later seed are ``train/seed_<s>/...`` (and ``.../seed_<s>``).

Early stopping (``finetune.early_stopping.eval_every`` set): every ``eval_every`` steps (and at the last) the model
is scored on a fixed sample of the dev split of the training locales (``max_dev_per_locale`` utterances each),
logged as ``dev/massive/<locale|avg>/<score>`` at the step; training stops after ``patience`` evaluations without
a better ``dev/massive/avg/<metric>`` (:class:`EarlyStopping`) and the best-on-dev weights are restored before
testing (``finetune/best_step``). ``trainer.max_steps`` stays the cap.

With ``baseline=runs:/<finetune run id>`` (or ``baseline=finetune``: the finished finetune run lineage resolves with
``lineage.overrides.finetune``, never trained here), evaluated on the same locales, it also tags the run
``atm.baseline_run_id`` and logs the relative error-rate change of the means against that run,
``compare/massive/<locale|avg>/<score>_rel_error_change`` = (err - err_baseline) / err_baseline with
err = 1 - score (negative = fewer errors; AlexaTM, FitzGerald et al. KDD 2022, Tables 4-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from atm import lineage, sweeps, tracking
from atm import metrics as M
from atm.data.collate import batch_stream
from atm.data.massive import intent_labels, slot_labels
from atm.engine.loop import StopTraining, device_for, fit
from atm.engine.state import run_state_dir
from atm.errors import AtmError
from atm.models import cost
from atm.models.encoder import load_checkpoint
from atm.models.heads import JointIntentSlotModel
from atm.stages.common import check_data, check_locales, log_model
from atm.stages.registry import all_stages, canonical_name, stage
from atm.stats import bootstrap_interval, mean_score, micro_f1, seed_interval
from atm.tasks.massive import (
    SCORE_COLUMNS,
    SCORES,
    collator,
    encode,
    eval_examples,
    eval_set,
    evaluate_sets,
    log_prediction_rows,
    prediction_rows,
    sample_locales,
    score_value,
    standard_errors,
    train_examples,
)

SETTINGS = ("full", "zero_shot")
TAG_SETTING = "atm.finetune.setting"
TAG_FROZEN = "atm.finetune.freeze_encoder"
TAG_BASELINE = "atm.baseline_run_id"


# ------------------------------------------------------------------------------- early stopping


class EarlyStopping:
    """``fit`` callback: early stopping on held-out data, keeping the best weights (Prechelt 1998, "Early
    stopping -- but when?", the "patience" rule).

    Every ``every`` optimiser steps and at step ``max_steps`` it calls ``evaluate(step) -> score`` (higher is
    better; the RNG streams are forked, so evaluating or not trains the same model) and keeps a CPU copy of the
    module's weights whenever the score beats the best so far (strictly: a tie keeps the earlier weights). After
    ``patience`` evaluations in a row without a better score it raises :class:`~atm.engine.loop.StopTraining`.
    :meth:`restore` loads the best weights back. Its state (best score, step, weights, count) is saved with a
    resumable training state; a resumed run that had stopped stops again at its next step.
    """

    def __init__(self, module: torch.nn.Module, evaluate: Callable[[int], float], every: int, patience: int,
                 max_steps: int):
        self.module, self.evaluate = module, evaluate
        self.every, self.patience, self.max_steps = int(every), int(patience), int(max_steps)
        self.best, self.best_step, self.since_best, self.stopped = -math.inf, 0, 0, False
        self.best_state: dict[str, torch.Tensor] | None = None

    def __call__(self, step: int) -> None:
        if self.stopped:
            raise StopTraining
        if step % self.every and step != self.max_steps:
            return
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            score = float(self.evaluate(step))
        self.module.train()
        if score > self.best:
            self.best, self.best_step, self.since_best = score, step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        else:
            self.since_best += 1
        if self.since_best >= self.patience:
            self.stopped = True
            raise StopTraining

    def restore(self) -> int:
        """Load the best weights into the module; returns their step (0: never evaluated, weights kept)."""
        if self.best_state is not None:
            self.module.load_state_dict(self.best_state)
        return self.best_step

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best,
                "stopped": self.stopped, "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]
        self.stopped, self.best_state = state["stopped"], state["best_state"]


def early_stopping_settings(ft: DictConfig) -> DictConfig | None:
    """``finetune.early_stopping`` when it is on (``eval_every`` set), else None."""
    es = ft.get("early_stopping")
    return es if es is not None and es.get("eval_every") is not None else None


# ---------------------------------------------------------------------------------------- seeds


def seed_results(per_seed: dict[int, dict[str, np.ndarray]], n_words: dict[str, int],
                 prefix: str = "eval/massive") -> dict[str, float]:
    """The scores of several seeds' models on the same utterances, with their intervals.

    Args:
        per_seed: ``{seed: {locale: per-utterance scores (n, 5)}}`` (:func:`atm.metrics.massive_example_scores`),
            every seed scored on the same utterances of the same locales.
        n_words: words per locale (the n of the slot-F1 standard error).

    Returns:
        Per locale and score: ``<prefix>/<locale>/<score>`` = the mean over seeds, ``.../<score>/seed_<s>``,
        ``<score>_lo``/``_hi`` (Student-t across seeds with several seeds, :func:`atm.stats.seed_interval`; with
        one, the percentile bootstrap over utterances, :func:`atm.stats.bootstrap_interval` with
        :func:`atm.stats.mean_score`, or :func:`atm.stats.micro_f1` for slot F1), ``<score>_se`` (binomial, of the
        mean) and ``<prefix>/<locale>/n``; per score ``<prefix>/avg/<score>`` (mean over locales) and
        ``/seed_<s>``, plus ``_lo``/``_hi`` across seeds when there are several.
    """
    seeds = list(per_seed)
    out: dict[str, float] = {}
    for loc, words in n_words.items():
        scores = np.stack([per_seed[s][loc] for s in seeds]).astype(np.float64)  # (seeds, n, 5)
        means = {}
        for score in SCORES:
            values = [score_value(scores[i], score) for i in range(len(seeds))]
            out.update({f"{prefix}/{loc}/{score}/seed_{s}": v for s, v in zip(seeds, values)})
            if len(seeds) > 1:
                interval = seed_interval(values)
            else:
                statistic = micro_f1 if score == "slot_f1" else mean_score
                interval = bootstrap_interval(scores[:, :, SCORE_COLUMNS[score]], statistic)
            means[score] = float(np.mean(values))
            out.update({f"{prefix}/{loc}/{score}_lo": interval.lo, f"{prefix}/{loc}/{score}_hi": interval.hi})
        out.update({f"{prefix}/{loc}/{k}": v for k, v in means.items()})
        out.update({f"{prefix}/{loc}/{k}": v for k, v in standard_errors(means, scores.shape[1], words).items()})
        out[f"{prefix}/{loc}/n"] = float(scores.shape[1])
    for score in SCORES:
        values = [float(np.mean([out[f"{prefix}/{loc}/{score}/seed_{s}"] for loc in n_words])) for s in seeds]
        out.update({f"{prefix}/avg/{score}/seed_{s}": v for s, v in zip(seeds, values)})
        out[f"{prefix}/avg/{score}"] = float(np.mean(values))
        if len(seeds) > 1:
            interval = seed_interval(values)
            out.update({f"{prefix}/avg/{score}_lo": interval.lo, f"{prefix}/avg/{score}_hi": interval.hi})
    return out


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
    ref = str(cfg.baseline)
    if ref.startswith("runs:/") or canonical_name(ref) not in all_stages():
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


def massive_table(results: dict[str, float], locales: Sequence[str], prefix: str = "eval/massive") -> list[dict]:
    """Rows ``locale, n, <score>, <score>_lo, <score>_hi, <score>_se[, <score>_rel_error_change]`` for each
    locale, then ``avg`` (the mean over locales; its ``n`` is the total number of utterances, its interval the
    one across seeds, blank with one seed)."""
    rows = []
    for loc in [*locales, "avg"]:
        row: dict = {"locale": loc, "n": sum(int(results[f"{prefix}/{x}/n"]) for x in locales) if loc == "avg"
                     else int(results[f"{prefix}/{loc}/n"])}
        for s in SCORES:
            row[s] = results[f"{prefix}/{loc}/{s}"]
            for suffix in ("_lo", "_hi", "_se"):
                row[f"{s}{suffix}"] = results.get(f"{prefix}/{loc}/{s}{suffix}")
            change = results.get(f"compare/massive/{loc}/{s}_rel_error_change")
            if change is not None:
                row[f"{s}_rel_error_change"] = change
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- stage


def _count(value, key: str, *, null: bool) -> None:
    """``value`` must be an integer >= 1 (or null when ``null``); AtmError naming ``key`` otherwise."""
    if value is None and null:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AtmError(f"{key}={value!r} must be an integer >= 1" + (" or null" if null else ""))


def check(cfg: DictConfig) -> None:
    """Config-time validation of the ``finetune`` group (before any input is trained).

    Raises:
        AtmError: naming the key: an unknown ``setting``, empty locale lists, evaluation locales that
            contradict the setting, a cap that is not a positive integer or null, ``seeds`` not a non-empty list
            of distinct integers, bad ``early_stopping`` settings, or a malformed ``baseline`` reference; an
            unknown MASSIVE locale (:func:`atm.stages.common.check_locales`); bad ``data`` values (:func:`atm.stages.common.check_data`);
            ``slot_loss_coef`` < 0.
    """
    check_data(cfg)
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
    for key in ("max_train_per_locale", "max_eval_per_locale"):
        _count(ft[key], f"finetune.{key}", null=True)
    coef = ft.get("slot_loss_coef", 1.0)
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
        raise AtmError(f"finetune.slot_loss_coef={coef!r} must be a number >= 0")
    check_locales(cfg)
    seeds = ft.get("seeds")
    if not isinstance(seeds, Sequence) or isinstance(seeds, str) or not seeds:
        raise AtmError(f"finetune.seeds={seeds!r} must be a non-empty list of integer seeds")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise AtmError(f"finetune.seeds: {seed!r} is not an integer seed")
    if len(set(seeds)) != len(seeds):
        raise AtmError(f"finetune.seeds={list(seeds)} repeats a seed (each seed trains one model)")
    es = early_stopping_settings(ft)
    if es is not None:
        _count(es.eval_every, "finetune.early_stopping.eval_every", null=True)
        _count(es.get("patience"), "finetune.early_stopping.patience", null=False)
        _count(es.get("max_dev_per_locale"), "finetune.early_stopping.max_dev_per_locale", null=True)
        if es.get("metric") not in SCORES:
            raise AtmError(f"finetune.early_stopping.metric={es.get('metric')!r} must be one of {', '.join(SCORES)}")
        trainer = cfg.get("trainer") or {}
        if trainer.get("backend") == "deepspeed" and (trainer.get("deepspeed") or {}).get("zero_stage") == 3:
            raise AtmError("finetune.early_stopping keeps a copy of the whole weights: ZeRO stage 3 shards them "
                           "(trainer.deepspeed.zero_stage=3); use a stage <= 2 or "
                           "finetune.early_stopping.eval_every=null")
    ref = str(cfg.get("baseline") or "")
    if ref:
        name = canonical_name(ref)
        if name in all_stages() and name not in ("finetune", "distill_task"):
            raise AtmError(f"baseline={ref}: a {name} run has no MASSIVE scores; name a finetune run "
                           f"(baseline=finetune or runs:/<run_id>)")
        if name not in all_stages():
            baseline_run_id(ref)


def train_seed(cfg: DictConfig, encoder, tokenizer, train_items: list[dict], seed: int, first: bool,
               dev_sets: dict, test_sets: dict, intents: list[str],
               slots: list[str]) -> tuple[JointIntentSlotModel, dict[str, float]]:
    """Fine-tune one model with ``seed`` (heads, dropout and batch order; ``transformers.set_seed``) on the
    tokenized ``train_items``; with early stopping on ``dev_sets``, the best-on-dev weights are restored.
    The ``first`` seed's metrics carry no seed suffix (see the module doc); only it reports its scores on
    ``test_sets`` to a sweep's pruner (what the objective reads).

    Returns:
        ``(model, summary)``: ``fit``'s summary (``train/...`` or ``train/seed_<s>/...``) and, with early
        stopping, ``finetune/best_step/seed_<s>`` (and ``finetune/best_step`` for the first seed).
    """
    from transformers import set_seed

    ft = cfg.finetune
    set_seed(seed)
    model = JointIntentSlotModel.from_encoder(encoder, intents, slots, pooling=ft.pooling,
                                              intent_layer=ft.intent_layer, slot_loss_coef=ft.slot_loss_coef,
                                              freeze_encoder=ft.freeze_encoder)
    model.to(device_for(cfg.trainer))
    stream = batch_stream(train_items, cfg.trainer.batch_size, collator(tokenizer), seed)
    callbacks = list(sweeps.pruning_callbacks(cfg, model, lambda: evaluate_sets(
        model, tokenizer, test_sets, intents, slots, "eval/massive")[0])) if first else []
    es = early_stopping_settings(ft)
    stopper = None
    if es is not None:
        def dev_score(step: int) -> float:
            results, _ = evaluate_sets(model, tokenizer, dev_sets, intents, slots, "dev/massive")
            curve = {k: v for k, v in results.items() if k.rsplit("/", 1)[-1] in SCORES}
            mlflow.log_metrics({**(curve if first else {}), **{f"{k}/seed_{seed}": v for k, v in curve.items()}},
                               step=step)
            return results[f"dev/massive/avg/{es.metric}"]

        stopper = EarlyStopping(model, dev_score, es.eval_every, es.patience, cfg.trainer.max_steps)
        callbacks.append(stopper)
    state_dir = run_state_dir(cfg.trainer)
    if state_dir is not None and not first:
        state_dir = state_dir / f"seed_{seed}"
    summary = fit(model, stream, lambda batch, step: (model(**batch).loss, {}), cfg.trainer,
                  desc=f"finetune seed {seed}", metric_prefix="train" if first else f"train/seed_{seed}",
                  callbacks=callbacks, state_dir=state_dir)
    if stopper is not None:
        best = float(stopper.restore())
        summary.update({f"finetune/best_step/seed_{seed}": best, **({"finetune/best_step": best} if first else {})})
    return model, summary


@stage("finetune", reads=("trainer", "data", "finetune"), check=check, kinds=("classifier:massive",))
def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Fine-tune one model per seed of ``finetune.seeds`` on ``finetune.locales`` (train partition), evaluate
    each on ``finetune.eval_locales`` and log the means over seeds with intervals (see the module doc)."""
    ft = cfg.finetune
    seeds = [int(s) for s in ft.seeds]
    path = inputs["encoder"].path
    mlflow.set_tags({TAG_SETTING: ft.setting, TAG_FROZEN: str(bool(ft.freeze_encoder)).lower()})
    baseline = None
    if cfg.get("baseline"):
        baseline_id = resolve_baseline(cfg, mlflow.active_run().info.experiment_id)
        mlflow.set_tag(TAG_BASELINE, baseline_id)
        baseline = baseline_scores(baseline_id, list(ft.eval_locales))
    encoder, tokenizer = load_checkpoint(path)
    test = eval_examples(ft)  # fails on a locale without data before anything is trained
    es = early_stopping_settings(ft)
    dev = {} if es is None else sample_locales(list(ft.locales), "dev", es.max_dev_per_locale,
                                               "finetune.early_stopping.max_dev_per_locale", "finetune.locales")
    train = train_examples(ft, cfg.seed)
    mlflow.log_metrics({"data/train_examples": len(train), **({"data/dev_examples": sum(map(len, dev.values()))}
                                                                 if dev else {})})
    intents, slots = intent_labels(), slot_labels()
    max_len = cfg.data.max_seq_len
    train_items = encode(tokenizer, train, intents, slots, max_len)
    test_sets = {loc: eval_set(tokenizer, items, intents, slots, max_len) for loc, items in test.items()}
    dev_sets = {loc: eval_set(tokenizer, items, intents, slots, max_len) for loc, items in dev.items()}
    per_seed, rows, model, summary = {}, {loc: [] for loc in test}, None, {}
    for index, seed in enumerate(seeds):
        trained, seed_summary = train_seed(cfg, encoder, tokenizer, train_items, seed, index == 0, dev_sets,
                                           test_sets, intents, slots)
        if index == 0:
            model = trained
        summary.update(seed_summary)
        _, outputs = evaluate_sets(trained, tokenizer, test_sets, intents, slots, "eval/massive")
        per_seed[seed] = {loc: out[0] for loc, out in outputs.items()}
        for loc, (_, pred_intents, pred_tags) in outputs.items():
            rows[loc] += prediction_rows(test_sets[loc].examples, pred_intents, pred_tags, seed)
        del trained
    del encoder
    results = seed_results(per_seed, {loc: data.n_words for loc, data in test_sets.items()})
    for loc, locale_rows in rows.items():
        log_prediction_rows(loc, locale_rows)
    if baseline is not None:
        results.update(relative_error_changes(results, baseline))
    mlflow.log_metrics({**results, **{k: v for k, v in summary.items() if k.startswith("finetune/")}},
                       step=cfg.trainer.max_steps)
    tracking.log_table(massive_table(results, list(test)), "evaluation/massive")
    log_model(model, tokenizer, "checkpoint")
    return {**summary, **results, **cost.measure(model, tokenizer, cfg)}
