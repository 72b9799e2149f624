#!/usr/bin/env python
"""AutoDistiller: which task-distillation recipe for a new dataset?  (Distiller, He et al. 2021)

Distiller's AutoDistiller learns, from the results of earlier distillation sweeps, a model over (dataset
features, recipe features) that predicts the distilled student's *relative score* -- student score /
teacher score -- and, for a new dataset, ranks the candidate recipes by the predicted ratio. This script
does that from the ``distill_task`` runs in MLflow.

Design (what is a row, a dataset, a recipe):

* **Trials** are the FINISHED runs with ``atm.stage=distill_task`` (e.g. the trials of
  ``python -m atm.train -m +sweep=autodistiller_massive`` and ``+sweep=autodistiller_xnli``). Each run is
  tagged ``atm.datasets`` (the dataset ids it scored) and ``atm.train_languages``; the ratio of each dataset
  is the metric named by :data:`atm.stages.distill_task.DATASET_METRICS`
  (``eval/massive/<locale>/intent_accuracy_ratio``, ``.../slot_f1_ratio``, ``eval/xnli/<lang>/accuracy_ratio``).
* **Dataset** = (task, language slice): ``massive_intent/<locale>``, ``massive_slots/<locale>``
  (MASSIVE, trained and scored on that locale) and ``xnli/<lang>`` (trained on English, scored on
  ``<lang>``, zero-shot but for English). Its features (:data:`DATASET_FEATURES`) are computed from the real
  data (``ATM_DATA_MIRROR``): ``log_train_size`` (natural log of the training examples available in the
  training languages), ``n_train_languages``, ``n_labels`` (60 intents, the BIO slot tags, 3 NLI classes),
  ``token_level`` (1 for slot filling), ``zero_shot`` (scored language not trained on), and from the text of
  the scored language (MASSIVE train utterances; XNLI test premise + hypothesis; first
  :data:`TEXT_SAMPLE` examples): ``mean_words`` (whitespace words, characters for ja/zh), ``type_token_ratio``
  (over the first :data:`TTR_TOKENS` lowercased words) and ``non_ascii`` (share of non-ASCII letters: the
  script).
* **Recipe** = the distillation choices of the run, read from its params (:data:`RECIPE_PARAMS`: logit
  loss, temperature and its schedule, T^2 scaling, loss weights, training steps/lr/batch, and -- when a
  stage logs them -- intermediate objective, layer mapping, augmentation) plus the ``data/train_examples``
  metric. Categorical ones are one-hot encoded, numeric ones used as they are; the recipe's identity is the
  tuple of these values (runs of the same recipe on the same dataset, e.g. other seeds, are averaged).
* **Model**: a scikit-learn regressor of the ratio on [dataset features, recipe features] (``--model``:
  ``gbr`` gradient boosting (default), ``rf`` random forest, ``ridge`` standardised ridge regression with
  built-in cross-validated alpha).

Evaluation is leave-one-dataset-out (LODO): for each dataset, fit on the rows of every other dataset and
predict the ratio of every recipe tried on the held-out one. Per dataset it reports the Spearman rank
correlation (``scipy.stats.spearmanr``) between predicted and observed ratios, ``regret@1`` = best observed
ratio - observed ratio of the top-1 predicted recipe, and ``regret@k`` = best observed - best observed among
the top-k predicted; then the means over datasets. The same figures for the *mean-recipe baseline* (rank
recipes by their mean ratio on the other datasets, ignoring dataset features) tell whether the dataset
features help. Finally the model is fitted on everything and ranks every recipe in the history for the new
dataset given by ``--task`` and ``--language`` (featurised from the real data): the top-k recommendations.

Outputs (written atomically to ``--out``, default ``analysis/out/autodistiller/``): ``autodistiller.md``
(the printed tables), ``lodo.csv`` (per-dataset figures), ``predictions.csv`` (LODO predicted vs observed
per row), ``recommendations.csv``, ``history.csv`` (the rows with their features) and
``pred_vs_observed.png``; all logged as artifacts of an MLflow run tagged ``atm.stage=analysis``,
``atm.analysis=autodistiller`` with the consumed trial run ids and the mean figures as metrics
``lodo/{spearman,regret_at_1,regret_at_<k>}`` and ``baseline/...``.

Usage (from the repo root, with ``ATM_DATA_MIRROR`` set)::

    python analysis/autodistiller.py                                  # recommend for massive_intent/es-ES
    python analysis/autodistiller.py --task xnli --language vi --k 5
    python analysis/autodistiller.py --model ridge --no-log --run-id <distill_task run id> ...

Errors (no store/experiment, no finished distill_task runs, fewer than 3 datasets, unknown task or
language) print one ``error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from analysis._output import format_markdown_table, publish, pyplot
from analysis._runs import param_value
from analysis._store import RunIndex, analysis_parser, cli, run_label
from atm.errors import AtmError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd

ANALYSIS_NAME = "autodistiller"
STAGE = "distill_task"
MIN_DATASETS = 3
#: Recipe params read from each run: (param key, "cat" | "num"). Missing params read as "none" / NaN.
RECIPE_PARAMS: tuple[tuple[str, str], ...] = (
    ("distill.logit.loss", "cat"),
    ("distill.logit.temperature", "num"),
    ("distill.logit.temperature_end", "num"),
    ("distill.logit.t_squared", "cat"),
    ("distill.logit.weight", "num"),
    ("distill.hard_weight", "num"),
    ("distill.intermediate.loss", "cat"),
    ("distill.intermediate.layer_mapping", "cat"),
    ("augment.name", "cat"),
    ("augment.probability", "num"),
    ("trainer.max_steps", "num"),
    ("trainer.lr", "num"),
    ("trainer.batch_size", "num"),
)
TRAIN_EXAMPLES = "data/train_examples"
DATASET_FEATURES = ("log_train_size", "n_train_languages", "n_labels", "token_level", "zero_shot",
                    "mean_words", "type_token_ratio", "non_ascii")
TEXT_SAMPLE = 2000
TTR_TOKENS = 5000
MODELS = ("gbr", "rf", "ridge")


# ---------------------------------------------------------------------------------------------
# dataset features (real data)


def _text_stats(token_lists: Sequence[Sequence[str]]) -> dict[str, float]:
    """``mean_words``, ``type_token_ratio`` (first :data:`TTR_TOKENS` lowercased tokens), ``non_ascii``."""
    tokens = [t for tokens in token_lists for t in tokens]
    head = [t.lower() for t in tokens[:TTR_TOKENS]]
    letters = [c for t in tokens for c in t if c.isalpha()]
    return {"mean_words": len(tokens) / max(1, len(token_lists)),
            "type_token_ratio": len(set(head)) / max(1, len(head)),
            "non_ascii": sum(not c.isascii() for c in letters) / max(1, len(letters))}


def _language_stats(source: str, lang: str) -> dict[str, float]:
    """Text statistics of one language of ``source`` (``massive``: train utterances; ``xnli``: test pairs)."""
    from atm.data.cache import derived
    from atm.data.fetch import fetch

    if source == "massive":
        from atm.data.massive import MASSIVE_ARCHIVE, read_massive

        def build():
            return _text_stats([ex.words for ex in read_massive([lang], ["train"])[:TEXT_SAMPLE]])

        return derived(f"autodistiller-massive-{lang}", 1, [fetch(MASSIVE_ARCHIVE)], build)
    from atm.data.xnli import xnli_test, xnli_test_languages

    if lang not in xnli_test_languages():
        raise AtmError(f"no labelled XNLI test set for language {lang!r} "
                       f"(available: {', '.join(xnli_test_languages())})")

    def build_xnli():
        return _text_stats([p.premise.split() + p.hypothesis.split() for p in xnli_test(lang)[:TEXT_SAMPLE]])

    return derived(f"autodistiller-xnli-{lang}", 1, [fetch(f"xnli/hf_jsonl/{lang}/test.jsonl.gz")], build_xnli)


def _train_size(source: str, languages: Sequence[str]) -> int:
    from atm.data.massive import massive_utterances
    from atm.data.xnli import xnli_train

    if source == "massive":
        return sum(len(v) for v in massive_utterances("train", list(languages)).values())
    return sum(len(xnli_train(lang)) for lang in languages)


def dataset_tasks() -> tuple[str, ...]:
    """The dataset tasks the AutoDistiller knows (those ``distill_task`` logs ratios for)."""
    from atm.stages.distill_task import DATASET_METRICS

    return tuple(DATASET_METRICS)


def default_train_languages(task: str, language: str) -> list[str]:
    """What ``distill_task`` trains on for a dataset: the locale itself (MASSIVE), English (XNLI)."""
    from atm.probes.xnli import TRAIN_LANGUAGE

    return [language] if task.startswith("massive") else [TRAIN_LANGUAGE]


def dataset_features(dataset: str, train_languages: Sequence[str]) -> dict[str, float]:
    """The :data:`DATASET_FEATURES` of ``<task>/<language>`` trained on ``train_languages``, from the real data.

    Raises:
        AtmError: a malformed id, an unknown task, or a language the data does not have.
    """
    from atm.data.massive import intent_labels, slot_labels

    task, sep, lang = dataset.partition("/")
    if not sep or not lang:
        raise AtmError(f"dataset id {dataset!r} must be <task>/<language>")
    if task not in dataset_tasks():
        raise AtmError(f"unknown task {task!r} (known: {', '.join(dataset_tasks())})")
    source = "massive" if task.startswith("massive") else "xnli"
    n_labels = {"massive_intent": lambda: len(intent_labels()), "massive_slots": lambda: len(slot_labels()),
                "xnli": lambda: 3}[task]()
    return {"log_train_size": math.log(max(1, _train_size(source, train_languages))),
            "n_train_languages": float(len(train_languages)), "n_labels": float(n_labels),
            "token_level": float(task == "massive_slots"), "zero_shot": float(lang not in train_languages),
            **_language_stats(source, lang)}


# ---------------------------------------------------------------------------------------------
# runs -> rows


def _param_value(params: dict[str, str], key: str, kind: str) -> Any:
    """A recipe param as ``"none"``/text (``cat``) or float/NaN (``num``); absent or null params read as those."""
    value = param_value(params.get(key))
    if kind == "cat":
        return "none" if value is None else str(value)
    return float(value) if isinstance(value, (int, float)) else math.nan


def history_frame(runs: Sequence[Any]) -> tuple[pd.DataFrame, list[str]]:
    """One row per (run, dataset): ``run_id``, ``dataset``, ``train_languages``, ``ratio`` and the recipe
    columns ``recipe.<param>`` (plus ``recipe.train_examples``). Returns ``(frame, notes)``; the notes say
    which runs or datasets were skipped (no ``atm.datasets`` tag, missing or NaN ratio)."""
    import pandas as pd

    from atm.stages.distill_task import (
        DATASET_METRICS,
        TAG_DATASETS,
        TAG_TRAIN_LANGUAGES,
    )

    rows, notes = [], []
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        ids = [d for d in tags.get(TAG_DATASETS, "").split(",") if d]
        if not ids:
            notes.append(f"run {run_label(run)} has no {TAG_DATASETS} tag; skipped")
            continue
        recipe = {f"recipe.{key}": _param_value(params, key, kind) for key, kind in RECIPE_PARAMS}
        recipe["recipe.train_examples"] = float(metrics.get(TRAIN_EXAMPLES, math.nan))
        for dataset in ids:
            task, _, lang = dataset.partition("/")
            template = DATASET_METRICS.get(task)
            value = metrics.get(template.format(lang=lang)) if template else None
            if value is None or not math.isfinite(value):
                notes.append(f"run {run_label(run)}: no finite ratio for {dataset}; row skipped")
                continue
            rows.append({"run_id": run.info.run_id, "dataset": dataset,
                         "train_languages": tags.get(TAG_TRAIN_LANGUAGES, ""), "ratio": float(value), **recipe})
    return pd.DataFrame(rows), notes


def recipe_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("recipe.")]


def add_recipe_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``recipe`` (a short label of the recipe's varying params, e.g. ``loss=kl T=4 hard_weight=0``)."""
    cols = recipe_columns(frame)
    varying = [c for c in cols if frame[c].astype(str).nunique() > 1]

    def label(row) -> str:
        parts = []
        for c in varying:
            value = row[c]
            text = f"{value:g}" if isinstance(value, float) else str(value)
            parts.append(f"{c.rsplit('.', 1)[-1]}={text}")
        return " ".join(parts) or "default"

    frame = frame.copy()
    frame["recipe"] = frame.apply(label, axis=1) if len(frame) else []
    return frame


def aggregate(frame: pd.DataFrame) -> pd.DataFrame:
    """Average repeated (dataset, recipe) rows (e.g. seeds); ``n_runs`` counts them."""
    keys = ["dataset", "train_languages", "recipe", *recipe_columns(frame)]
    grouped = frame.groupby(keys, dropna=False, sort=True)
    out = grouped["ratio"].mean().reset_index()
    out["n_runs"] = grouped["ratio"].size().values
    out["run_ids"] = grouped["run_id"].agg(",".join).values
    return out


def featurize(frame: pd.DataFrame, features: Callable[[str, Sequence[str]], dict[str, float]]) -> pd.DataFrame:
    """Join the dataset features of every row (computed once per dataset)."""
    import pandas as pd
    from tqdm.auto import tqdm

    cache = {}
    for dataset, langs in tqdm(sorted(set(zip(frame["dataset"], frame["train_languages"]))),
                               desc="dataset features", leave=False):
        train = [x for x in langs.split(",") if x] or default_train_languages(*dataset.split("/", 1))
        cache[(dataset, langs)] = features(dataset, train)
    feats = pd.DataFrame([cache[(d, t)] for d, t in zip(frame["dataset"], frame["train_languages"])],
                         index=frame.index)
    return pd.concat([frame, feats[list(DATASET_FEATURES)]], axis=1)


# ---------------------------------------------------------------------------------------------
# the model


class Encoder:
    """Rows -> feature matrix: dataset features, numeric recipe params (NaN -> 0 plus nothing else: a param
    a stage does not log is constant), one-hot categorical recipe params (levels fixed at :meth:`fit`)."""

    def fit(self, frame: pd.DataFrame) -> Encoder:
        kinds = dict(RECIPE_PARAMS)
        self.numeric = [c for c in recipe_columns(frame) if kinds.get(c[len("recipe."):], "num") == "num"]
        self.categorical = {c: sorted(frame[c].astype(str).unique())
                            for c in recipe_columns(frame) if c not in self.numeric}
        self.names = [*DATASET_FEATURES, *self.numeric,
                      *(f"{c}={level}" for c, levels in self.categorical.items() for level in levels)]
        return self

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        import numpy as np

        blocks = [frame[list(DATASET_FEATURES)].to_numpy(float),
                  np.nan_to_num(frame[self.numeric].to_numpy(float), nan=0.0)]
        for c, levels in self.categorical.items():
            values = frame[c].astype(str).to_numpy()
            blocks.append(np.stack([(values == level).astype(float) for level in levels], axis=1))
        return np.concatenate(blocks, axis=1)


def make_model(name: str, seed: int = 0):
    """A fresh scikit-learn regressor: ``gbr``, ``rf`` or ``ridge``. AtmError for another name."""
    from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "gbr":
        return GradientBoostingRegressor(n_estimators=200, max_depth=3, learning_rate=0.05, subsample=0.8,
                                         random_state=seed)
    if name == "rf":
        return RandomForestRegressor(n_estimators=200, min_samples_leaf=1, random_state=seed, n_jobs=1)
    if name == "ridge":
        import numpy as np

        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    raise AtmError(f"--model {name!r} is not one of {', '.join(MODELS)}")


def ranking_figures(predicted: Sequence[float], observed: Sequence[float], k: int) -> dict[str, float]:
    """Spearman rho (NaN with fewer than 2 recipes or a constant side), ``regret@1`` and ``regret@k`` (ratio
    units: best observed minus the best observed among the top-1 / top-k predicted recipes)."""
    import numpy as np
    from scipy import stats

    predicted, observed = np.asarray(predicted, float), np.asarray(observed, float)
    order = np.argsort(-predicted, kind="stable")
    best = observed.max()
    rho = math.nan
    if len(observed) >= 2 and np.ptp(observed) > 0 and np.ptp(predicted) > 0:
        rho = float(stats.spearmanr(predicted, observed).statistic)
    return {"spearman": rho, "regret@1": float(best - observed[order[0]]),
            f"regret@{k}": float(best - observed[order[:k]].max()), "best_ratio": float(best)}


def lodo(table: pd.DataFrame, model_name: str, k: int, seed: int = 0,
         target: str = "ratio") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave-one-dataset-out evaluation.

    Args:
        table: :func:`aggregate` + :func:`featurize` rows (one per dataset x recipe).
        target: the column to predict (tests pass a shuffled copy here).

    Returns:
        ``(per_dataset, predictions)``: per dataset ``n_recipes``, ``spearman``, ``regret@1``,
        ``regret@k``, ``best_ratio``, ``top1_recipe``, ``best_recipe`` and the baseline's ``base_*``;
        predictions: the held-out rows with ``predicted`` and ``baseline``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    rows, preds = [], []
    for dataset in tqdm(sorted(table["dataset"].unique()), desc="leave-one-dataset-out", leave=False):
        train, test = table[table["dataset"] != dataset], table[table["dataset"] == dataset]
        encoder = Encoder().fit(train)
        model = make_model(model_name, seed).fit(encoder.transform(train), train[target].to_numpy(float))
        predicted = model.predict(encoder.transform(test))
        recipe_means = train.groupby("recipe")[target].mean()
        baseline = test["recipe"].map(recipe_means).fillna(train[target].mean()).to_numpy(float)
        observed = test[target].to_numpy(float)
        figures = ranking_figures(predicted, observed, k)
        base = ranking_figures(baseline, observed, k)
        recipes = test["recipe"].to_numpy()
        rows.append({"dataset": dataset, "n_recipes": len(test), **figures,
                     **{f"base_{key}": value for key, value in base.items() if key != "best_ratio"},
                     "top1_recipe": recipes[predicted.argmax()], "best_recipe": recipes[observed.argmax()]})
        preds.append(test.assign(predicted=predicted, baseline=baseline))
    return pd.DataFrame(rows), pd.concat(preds)


def recommend(table: pd.DataFrame, features: dict[str, float], model_name: str, k: int,
              seed: int = 0) -> pd.DataFrame:
    """Fit on every row, predict the ratio of every recipe in ``table`` for a dataset with ``features``;
    the top ``k`` by predicted ratio, with each recipe's mean observed ratio in the history."""
    import pandas as pd

    encoder = Encoder().fit(table)
    model = make_model(model_name, seed).fit(encoder.transform(table), table["ratio"].to_numpy(float))
    cols = recipe_columns(table)
    candidates = table.groupby("recipe", sort=True)[cols].first().reset_index()
    rows = candidates.assign(**{name: value for name, value in features.items()})
    candidates["predicted_ratio"] = model.predict(encoder.transform(rows))
    history = table.groupby("recipe")["ratio"].agg(["mean", "size"])
    candidates["history_mean_ratio"] = candidates["recipe"].map(history["mean"])
    candidates["history_datasets"] = candidates["recipe"].map(history["size"]).astype(int)
    top = candidates.sort_values("predicted_ratio", ascending=False, kind="stable").head(k)
    return pd.concat([pd.DataFrame({"rank": range(1, len(top) + 1)}), top.reset_index(drop=True)], axis=1)


# ---------------------------------------------------------------------------------------------
# output


LODO_COLUMNS = ["dataset", "n_recipes", "spearman", "regret@1", "regret@{k}", "base_spearman", "base_regret@1",
                "best_ratio", "top1_recipe", "best_recipe"]


def lodo_summary(per_dataset: pd.DataFrame, k: int) -> dict[str, float]:
    """Means over datasets: ``lodo/{spearman,regret@1,regret@k}`` and the baseline's ``baseline/...``."""
    out = {}
    for key in ("spearman", "regret@1", f"regret@{k}"):
        out[f"lodo/{key}"] = float(per_dataset[key].mean())
        out[f"baseline/{key}"] = float(per_dataset[f"base_{key}"].mean())
    return out


def render(per_dataset: pd.DataFrame, summary: dict[str, float], recs: pd.DataFrame, k: int,
           header: str, new_dataset: str) -> str:
    import pandas as pd

    cols = list(dict.fromkeys(c.format(k=k) for c in LODO_COLUMNS))  # k=1: regret@k is regret@1
    mean = {"dataset": "**mean**", "n_recipes": int(per_dataset["n_recipes"].sum()),
            "spearman": summary["lodo/spearman"], "regret@1": summary["lodo/regret@1"],
            f"regret@{k}": summary[f"lodo/regret@{k}"], "base_spearman": summary["baseline/spearman"],
            "base_regret@1": summary["baseline/regret@1"], "best_ratio": per_dataset["best_ratio"].mean(),
            "top1_recipe": "", "best_recipe": ""}
    shown = pd.concat([per_dataset[cols], pd.DataFrame([mean])], ignore_index=True)
    fmt = {c: ".3f" for c in ("spearman", "regret@1", f"regret@{k}", "base_spearman", "base_regret@1",
                              "best_ratio")}
    rec_cols = ["rank", "recipe", "predicted_ratio", "history_mean_ratio", "history_datasets"]
    return (f"{header}\n\nLeave-one-dataset-out (ratio = student score / teacher score; regret in ratio units; "
            f"base_* = mean-recipe baseline)\n\n{format_markdown_table(shown, {**fmt, 'n_recipes': 'd'})}\n\n"
            f"Top-{k} recipes for {new_dataset}\n\n"
            f"{format_markdown_table(recs[rec_cols], {'predicted_ratio': '.3f', 'history_mean_ratio': '.3f'})}\n")


def plot(predictions: pd.DataFrame, summary: dict[str, float]) -> Any:
    """LODO predicted vs observed ratio, one colour per held-out dataset (a matplotlib figure)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    datasets = sorted(predictions["dataset"].unique())
    cmap = plt.get_cmap("tab20" if len(datasets) > 10 else "tab10")
    for i, dataset in enumerate(datasets):
        sub = predictions[predictions["dataset"] == dataset]
        ax.scatter(sub["ratio"], sub["predicted"], s=24, color=cmap(i % cmap.N), label=dataset)
    lo = min(predictions["ratio"].min(), predictions["predicted"].min())
    hi = max(predictions["ratio"].max(), predictions["predicted"].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, alpha=0.5)
    ax.set_xlabel("observed student/teacher ratio")
    ax.set_ylabel("LODO predicted ratio")
    ax.set_title(f"AutoDistiller LODO: mean Spearman {summary['lodo/spearman']:.2f}, "
                 f"regret@1 {summary['lodo/regret@1']:.3f}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    parser = analysis_parser(
        ANALYSIS_NAME,
        "Learn the student/teacher ratio from dataset and recipe features over the distill_task trials in "
        "MLflow; print a leave-one-dataset-out evaluation and the top-k recipes for a new dataset.",
        f"{STAGE} run id(s) to learn from (default: every finished {STAGE} run of the experiment)")
    parser.add_argument("--task", default="massive_intent",
                        help="task of the new dataset: massive_intent, massive_slots or xnli (default: massive_intent)")
    parser.add_argument("--language", default=None,
                        help="MASSIVE locale or XNLI language of the new dataset (default: es-ES for MASSIVE, "
                        "vi for XNLI)")
    parser.add_argument("--k", type=int, default=3, help="how many recipes to recommend; regret@k (default 3)")
    parser.add_argument("--model", choices=MODELS, default="gbr", help="regressor (default gbr)")
    parser.add_argument("--seed", type=int, default=0, help="random state of the regressor (default 0)")
    return parser


def _trials(index: RunIndex, run_ids: Sequence[str] | None) -> list:
    if run_ids:
        return index.select(run_ids, [STAGE])
    runs = index.of_stage(STAGE, finished_only=False)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if not finished:
        raise AtmError(f"no finished {STAGE} runs {index.where} ({len(runs)} unfinished); run "
                       f"`python -m atm.train -m +sweep=autodistiller_massive` first")
    if len(finished) < len(runs):
        print(f"note: skipped {len(runs) - len(finished)} unfinished {STAGE} run(s)", file=sys.stderr)
    return finished


def _run(args: argparse.Namespace) -> int:
    if args.task not in dataset_tasks():
        raise AtmError(f"--task {args.task!r} is unknown (known: {', '.join(dataset_tasks())})")
    if args.k < 1:
        raise AtmError(f"--k {args.k} must be >= 1")
    language = args.language or ("es-ES" if args.task.startswith("massive") else "vi")
    new_dataset = f"{args.task}/{language}"
    index = RunIndex.open(args)
    runs = _trials(index, args.run_ids)
    frame, notes = history_frame(runs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if frame.empty:
        raise AtmError(f"none of the {len(runs)} {STAGE} run(s) has a dataset ratio (tag atm.datasets + "
                       f"*_ratio metrics); they predate the AutoDistiller")
    table = aggregate(add_recipe_ids(frame))
    n_datasets = table["dataset"].nunique()
    if n_datasets < MIN_DATASETS:
        raise AtmError(f"found {n_datasets} dataset(s) ({', '.join(sorted(table['dataset'].unique()))}) in "
                       f"{len(runs)} {STAGE} run(s); leave-one-dataset-out needs at least {MIN_DATASETS}")
    new_features = dataset_features(new_dataset, default_train_languages(args.task, language))
    table = featurize(table, dataset_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_dataset, predictions = lodo(table, args.model, args.k, args.seed)
        recs = recommend(table, new_features, args.model, args.k, args.seed)
    summary = lodo_summary(per_dataset, args.k)
    header = (f"AutoDistiller ({args.model}) over {len(table)} (dataset, recipe) rows from {len(runs)} {STAGE} "
              f"run(s): {n_datasets} datasets, {table['recipe'].nunique()} recipes, experiment "
              f"'{index.experiment.name}'")
    markdown = render(per_dataset, summary, recs, args.k, header, new_dataset)
    files = {"autodistiller.md": markdown, "lodo.csv": per_dataset, "predictions.csv": predictions,
             "recommendations.csv": recs, "history.csv": table, "pred_vs_observed.png": plot(predictions, summary)}
    publish(args, index, ANALYSIS_NAME, markdown, files, consumed_run_ids=[r.info.run_id for r in runs],
               metrics={**{key.replace("@", "_at_"): value for key, value in summary.items()},  # MLflow: no "@"
                        "n_datasets": n_datasets, "n_recipes": table["recipe"].nunique()},
               params={"model": args.model, "k": args.k, "seed": args.seed, "new_dataset": new_dataset,
                       "top1_recipe": recs["recipe"].iloc[0], "n_runs": len(runs), "n_rows": len(table)})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 2 user error)."""
    return cli(build_parser, _run, argv)


if __name__ == "__main__":
    sys.exit(main())
