"""analysis/autodistiller.py: ranking figures by hand, LODO on a synthetic trial history with a known rule
(real dataset features), a shuffled-label control, the CLI on a throw-away SQLite store (outputs, MLflow
analysis run, one-line errors), and the CLI on a tiny real sweep the platform ran (`+sweep=autodistiller_xnli`)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY, atm_train, mlflow_store
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from scipy import stats

from atm.stages.distill_task import DATASET_METRICS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "analysis" / "autodistiller.py"
LOCALES = ("en-US", "de-DE", "fr-FR")
XNLI_LANGS = ("en", "de", "fr")
LOSSES = ("soft_ce", "kl", "logit_mse")
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


def _load_script():
    spec = importlib.util.spec_from_file_location("autodistiller_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ad = _load_script()


def rule(dataset: str, loss: str, temperature: float, noise: float) -> float:
    """The generating rule: logit MSE loses 0.1; slot filling (token level) gains with log T, every other
    dataset loses with it -- so the best recipe depends on a dataset feature."""
    sign = 1.0 if dataset.startswith("massive_slots") else -1.0
    return 0.7 + 0.1 * (loss != "logit_mse") + 0.03 * sign * math.log2(temperature) + noise


def _trial(client, exp, task, datasets_, train_langs, loss, temperature, ratios, finished=True):
    tags = {"atm.stage": "distill_task", "atm.task": task, "atm.datasets": ",".join(datasets_),
            "atm.train_languages": ",".join(train_langs)}
    run = client.create_run(exp, tags=tags, run_name=f"distill_task/{loss}/none/T={temperature:g}")
    params = {"distill.logit.loss": loss, "distill.logit.temperature": temperature, "distill.hard_weight": 1.0,
              "distill.logit.temperature_end": None, "distill.intermediate.loss": None, "trainer.max_steps": 100}
    now = int(time.time() * 1000)
    metrics = [Metric("data/train_examples", 200.0, now, 0)]
    for dataset, ratio in zip(datasets_, ratios):
        task_, lang = dataset.split("/")
        metrics.append(Metric(DATASET_METRICS[task_].format(lang=lang), ratio, now, 100))
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    if finished:
        client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, real_data_env):
    """Experiment 'atm': 3 MASSIVE locales x 12 recipes (2 datasets a run) + 12 XNLI runs (3 datasets each),
    ratios from :func:`rule` plus small noise; one unfinished run and one untagged run (skipped). Experiment
    'two': only 2 datasets. Data cache: the real mirror."""
    root = tmp_path_factory.mktemp("autodistiller")
    uri, client, exp = mlflow_store(root)
    rng = np.random.default_rng(0)
    truth = {}
    ids = []
    for loss in LOSSES:
        for t in TEMPERATURES:
            for loc in LOCALES:
                ds = [f"massive_intent/{loc}", f"massive_slots/{loc}"]
                ratios = [rule(d, loss, t, rng.normal(0, 0.004)) for d in ds]
                ids.append(_trial(client, exp, "massive", ds, [loc], loss, t, ratios))
                truth.update({(d, loss, t): r for d, r in zip(ds, ratios)})
            ds = [f"xnli/{lang}" for lang in XNLI_LANGS]
            ratios = [rule(d, loss, t, rng.normal(0, 0.004)) for d in ds]
            ids.append(_trial(client, exp, "xnli", ds, ["en"], loss, t, ratios))
            truth.update({(d, loss, t): r for d, r in zip(ds, ratios)})
    _trial(client, exp, "massive", ["massive_intent/en-US"], ["en-US"], "kl", 1.0, [0.01], finished=False)
    untagged = client.create_run(exp, tags={"atm.stage": "distill_task"})
    client.set_terminated(untagged.info.run_id)
    two = client.create_experiment("two", artifact_location=(root / "artifacts2").as_uri())
    for t in TEMPERATURES:
        _trial(client, two, "massive", ["massive_intent/en-US", "massive_slots/en-US"], ["en-US"], "kl", t,
               [0.8, 0.7])
    return {"uri": uri, "client": client, "exp": exp, "truth": truth, "ids": ids, "root": root}


@pytest.fixture(scope="module")
def table(store):
    client = store["client"]
    runs = client.search_runs([store["exp"]], "attributes.status = 'FINISHED'", max_results=1000)
    frame, notes = ad.history_frame(runs)
    assert len(notes) == 1 and "no atm.datasets tag" in notes[0]
    return ad.featurize(ad.aggregate(ad.add_recipe_ids(frame)), ad.dataset_features)


def test_ranking_figures_by_hand():
    # predicted order: recipe 1 (observed 0.6), recipe 2 (0.7), recipe 0 (0.8, the best)
    got = ad.ranking_figures([0.3, 0.9, 0.5], [0.8, 0.6, 0.7], k=2)
    assert got["spearman"] == pytest.approx(-1.0)
    assert got["regret@1"] == pytest.approx(0.2) and got["regret@2"] == pytest.approx(0.1)
    assert got["best_ratio"] == 0.8
    perfect = ad.ranking_figures([1, 2, 3, 4], [0.1, 0.2, 0.25, 0.9], k=3)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["regret@1"] == 0.0
    assert math.isnan(ad.ranking_figures([1.0, 1.0], [0.5, 0.6], k=1)["spearman"])  # constant prediction


def test_dataset_features_from_real_data(table):
    feats = table.drop_duplicates("dataset").set_index("dataset")
    assert set(feats.index) == {f"massive_{t}/{loc}" for t in ("intent", "slots") for loc in LOCALES} | {
        f"xnli/{lang}" for lang in XNLI_LANGS}
    assert feats.loc["massive_intent/en-US", "n_labels"] == 60  # MASSIVE's 60 intents
    assert feats.loc["massive_slots/en-US", "n_labels"] == 111  # O + B-/I- of 55 slot types
    assert feats.loc["xnli/de", "n_labels"] == 3
    assert feats.loc["massive_intent/de-DE", "log_train_size"] == pytest.approx(math.log(11514))
    assert feats.loc["xnli/de", "log_train_size"] == pytest.approx(math.log(9000))  # English train set
    assert list(feats.loc[["xnli/en", "xnli/de", "massive_slots/de-DE"], "zero_shot"]) == [0, 1, 0]
    assert feats.loc["massive_slots/fr-FR", "token_level"] == 1 and feats.loc["massive_intent/fr-FR", "token_level"] == 0
    # the same utterances give the same text statistics to both MASSIVE tasks of a locale
    assert feats.loc["massive_intent/de-DE", "mean_words"] == feats.loc["massive_slots/de-DE", "mean_words"]
    assert 3 < feats.loc["massive_intent/en-US", "mean_words"] < 15 < feats.loc["xnli/en", "mean_words"]
    assert feats.loc["massive_intent/en-US", "non_ascii"] == 0 < feats.loc["massive_intent/de-DE", "non_ascii"]


@pytest.fixture(scope="module")
def lodo_gbr(table):
    return ad.lodo(table, "gbr", k=3)


@pytest.mark.parametrize("model", ["gbr", "rf"])
def test_lodo_recovers_the_rule(table, lodo_gbr, model):
    assert len(table) == 9 * 12 and table["recipe"].nunique() == 12
    per, preds = lodo_gbr if model == "gbr" else ad.lodo(table, model, k=3)
    assert sorted(per["dataset"]) == sorted(table["dataset"].unique()) and set(per["n_recipes"]) == {12}
    summary = ad.lodo_summary(per, 3)
    assert summary["lodo/spearman"] > 0.85
    assert summary["lodo/regret@1"] < 0.03 and summary["lodo/regret@3"] <= summary["lodo/regret@1"]
    # the mean-recipe baseline cannot see that the temperature effect flips with the dataset
    assert summary["baseline/spearman"] < summary["lodo/spearman"] - 0.2
    # the regret is the observed gap to the best recipe, read back from the held-out rows
    for _, row in per.iterrows():
        held = preds[preds["dataset"] == row["dataset"]]
        chosen = held.loc[held["predicted"].idxmax()]
        assert row["regret@1"] == pytest.approx(held["ratio"].max() - chosen["ratio"])
        rho = stats.spearmanr(held["predicted"], held["ratio"]).statistic
        assert row["spearman"] == pytest.approx(rho)


def test_shuffled_labels_do_not_look_good(table, lodo_gbr):
    shuffled = table.assign(shuffled=np.random.default_rng(1).permutation(table["ratio"].to_numpy()))
    per_true, _ = lodo_gbr
    per_shuf, _ = ad.lodo(shuffled, "gbr", k=3, target="shuffled")
    rho = per_shuf["spearman"].mean()
    assert abs(rho) < 0.35, rho
    # regret is measured against the shuffled observations too; it must be clearly worse than the real fit
    assert per_shuf["regret@1"].mean() > per_true["regret@1"].mean() + 0.02


def _env():
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ATM_EXPERIMENT", None)
    env["TQDM_DISABLE"] = "1"
    return env


def test_cli_end_to_end(store, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tracking-uri", store["uri"], "--task", "massive_slots",
                           "--language", "es-ES", "--k", "2", "--out", str(out)],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unfinished distill_task run" in proc.stderr and "no atm.datasets tag" in proc.stderr
    assert "9 datasets, 12 recipes" in proc.stdout and "Top-2 recipes for massive_slots/es-ES" in proc.stdout
    lodo_csv = pd.read_csv(out / "lodo.csv")
    assert len(lodo_csv) == 9 and lodo_csv["spearman"].mean() > 0.85
    recs = pd.read_csv(out / "recommendations.csv")
    assert list(recs["rank"]) == [1, 2]
    # slot filling gains with T: the recommended recipe is a high-temperature soft-label one
    assert recs["recipe.distill.logit.temperature"].iloc[0] >= 4 and recs["recipe.distill.logit.loss"].iloc[0] != "logit_mse"
    history = pd.read_csv(out / "history.csv")
    got = history.set_index(["dataset", "recipe.distill.logit.loss", "recipe.distill.logit.temperature"])["ratio"]
    for key, value in list(store["truth"].items())[:10]:
        assert got.loc[key] == pytest.approx(value)
    with open(out / "pred_vs_observed.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "autodistiller.md").read_text() in proc.stdout + "\n"
    assert not list(out.glob(".*.tmp"))
    client = store["client"]
    runs = client.search_runs([store["exp"]], "tags.\"atm.analysis\" = 'autodistiller'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert set(run.data.tags["atm.consumed_run_ids"].split(",")) >= set(store["ids"])
    assert run.data.metrics["lodo/spearman"] == pytest.approx(lodo_csv["spearman"].mean())
    assert run.data.metrics["lodo/regret_at_2"] == pytest.approx(lodo_csv["regret@2"].mean())
    assert run.data.params["new_dataset"] == "massive_slots/es-ES"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "autodistiller.md", "lodo.csv", "predictions.csv", "recommendations.csv", "history.csv",
        "pred_vs_observed.png"}


@pytest.mark.parametrize("args,message", [
    (["--experiment", "two"], ("found 2 dataset(s) (massive_intent/en-US, massive_slots/en-US) in 4 distill_task "
                               "run(s); leave-one-dataset-out needs at least 3")),
    (["--task", "udpos"], "--task 'udpos' is unknown (known: massive_intent, massive_slots, xnli)"),
    (["--language", "xx-XX"], "unknown MASSIVE locale 'xx-XX'"),
    (["--task", "xnli", "--language", "ja"], "no labelled XNLI test set for language 'ja'"),
    (["--experiment", "nope"], "experiment 'nope' not found"),
])
def test_cli_one_line_errors(store, tmp_path, capsys, args, message):
    rc = ad.main(["--tracking-uri", store["uri"], "--out", str(tmp_path / "o"), "--no-log", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "o").exists()


def test_no_trials(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("atm", artifact_location=(tmp_path / "a").as_uri())
    client.set_terminated(client.create_run(exp, tags={"atm.stage": "finetune"}).info.run_id)
    rc = ad.main(["--tracking-uri", uri, "--out", str(tmp_path / "o"), "--no-log"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: no finished distill_task runs in experiment 'atm'") and err.count("\n") == 1


# ------------------------------------------------------------------------------- a real tiny sweep


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory, data_env):
    """`+sweep=autodistiller_xnli` with the tiny pipeline: 2 recipes (T = 1, 4) x 3 XNLI languages."""
    cwd = tmp_path_factory.mktemp("autodistiller_sweep")
    args = ["-m", "+sweep=autodistiller_xnli", "distill.logit.loss=soft_ce", "distill.hard_weight=1.0",
            "distill.logit.temperature=choice(1.0,4.0)", "stage.xnli_languages=[en,de,fr]", *TINY]
    result = atm_train(args, cwd, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def test_cli_on_a_real_sweep(real_sweep, data_env):
    uri = f"sqlite:///{real_sweep / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("atm")
    trials = client.search_runs([exp.experiment_id], "tags.\"atm.stage\" = 'distill_task'")
    assert len(trials) == 2 and all(r.data.tags["atm.datasets"] == "xnli/en,xnli/de,xnli/fr" for r in trials)
    teacher = client.search_runs([exp.experiment_id], "tags.\"atm.stage\" = 'finetune_xnli'")
    assert len(teacher) == 1  # trained once by lineage, shared by both trials
    for run in trials:
        m = run.data.metrics
        assert run.data.tags["atm.input.teacher"] == teacher[0].info.run_id
        for lang in ("en", "de", "fr"):
            student, teach = m[f"eval/xnli/{lang}/accuracy"], m[f"eval/xnli_teacher/{lang}/accuracy"]
            assert m[f"eval/xnli/{lang}/accuracy_ratio"] == pytest.approx(student / teach)
            # the teacher's scores on the same test pairs are those its own finetune_xnli run logged
            assert teach == pytest.approx(teacher[0].data.metrics[f"eval/xnli/{lang}/accuracy"])
    out = real_sweep / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--task", "xnli", "--language", "es", "--k", "1",
                           "--model", "ridge", "--out", str(out)],
                          cwd=real_sweep, env={**data_env, "MLFLOW_TRACKING_URI": uri}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "3 datasets, 2 recipes" in proc.stdout and "Top-1 recipes for xnli/es" in proc.stdout
    per = pd.read_csv(out / "lodo.csv").set_index("dataset")
    for lang in ("en", "de", "fr"):
        observed = [r.data.metrics[f"eval/xnli/{lang}/accuracy_ratio"] for r in trials]
        assert per.loc[f"xnli/{lang}", "best_ratio"] == pytest.approx(max(observed))
        assert per.loc[f"xnli/{lang}", "n_recipes"] == 2
    assert set(pd.read_csv(out / "recommendations.csv")["recipe"]) <= {"temperature=1", "temperature=4"}


def test_massive_sweep_composes_per_locale_trials():
    """The MASSIVE sweep file: a trial of locale L trains and scores on L, and L reaches its teacher."""
    from hydra import compose, initialize_config_dir

    from atm.lineage import CONF_DIR
    from atm.stages.distill_task import check, datasets

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+sweep=autodistiller_massive", "finetune.locales=[de-DE]",
                                                       "distill.logit.loss=logit_mse"])
    check(cfg)
    assert cfg.stage.name == "distill_task" and list(cfg.finetune.eval_locales) == ["de-DE"]
    assert datasets(cfg) == ["massive_intent/de-DE", "massive_slots/de-DE"]
    assert "finetune.locales" in cfg.lineage.inherit and "distill" not in cfg.lineage.inherit
    assert list(cfg.lineage.overrides.finetune) == ["encoder=pretrain_stage2"]
