"""End-to-end tests for analysis/correlate_xnli.py against a throw-away SQLite MLflow store."""

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
from scipy import stats

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient
from mlflow.entities import Metric

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "analysis" / "correlate_xnli.py"
PREDICTORS = {
    "perplexity_written": "eval/perplexity/written",
    "perplexity_spoken": "eval/perplexity/spoken",
    "mask_fill_noun_accuracy": "eval/mask_fill/noun_accuracy",
}
TARGET = "eval/xnli/avg_accuracy"
#: The columns correlations.csv has always had, in order (new ones may only follow them).
CSV_HEAD = ["scope", "language", "predictor", "metric", "target", "n", "pearson_r", "pearson_lo", "pearson_hi",
            "pearson_p", "spearman_rho", "spearman_lo", "spearman_hi", "spearman_p", "note"]


def _load_script():
    spec = importlib.util.spec_from_file_location("correlate_xnli_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env():
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ATM_EXPERIMENT", None)
    return env


def _checkpoint_metrics(rng, steps, scale):
    """Synthetic probes: perplexity falls, noun accuracy and XNLI rise, all with noise."""
    rows = []
    for step in steps:
        progress = 1.0 - math.exp(-step / 3000.0)
        xnli = 0.50 + 0.20 * scale * progress + rng.normal(0, 0.01)
        rows.append({
            "eval/perplexity/written": 8.0 + 40.0 * (1 - progress) / scale + rng.normal(0, 0.8),
            "eval/perplexity/spoken": 11.0 + 55.0 * (1 - progress) / scale + rng.normal(0, 1.5),
            "eval/mask_fill/noun_accuracy": 0.2 + 0.4 * progress * scale + rng.normal(0, 0.02),
            "eval/mask_fill/en/noun_accuracy": 0.25 + 0.4 * progress * scale,
            "eval/mask_fill/de/noun_accuracy": 0.15 + 0.4 * progress * scale,
            TARGET: xnli,
            "eval/xnli/en/accuracy": xnli + 0.05,
            "eval/xnli/de/accuracy": xnli - 0.05,
        })
    return rows


def _make_eval_run(client, exp_id, training_run_id, stage, steps_rows, name, finish=True):
    run = client.create_run(
        exp_id,
        run_name=name,
        tags={
            "atm.stage": "evaluate",
            "atm.evaluated_run_id": training_run_id,
            "atm.evaluated_stage": stage,
        },
    )
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now + i, step)
        for i, (step, row) in enumerate(steps_rows)
        for key, value in row.items()
    ]
    client.log_batch(run.info.run_id, metrics=metrics)
    if finish:
        client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with experiment 'atm': 2 finished pretrain evaluate runs (8 and 6 checkpoints),
    plus distractors that the default selection must skip; and experiments 'other' (no
    evaluate runs) and 'few' (one evaluate run with 2 checkpoints)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    artifacts = (root / "artifacts").as_uri()
    exp = client.create_experiment("atm", artifact_location=artifacts + "/atm")
    rng = np.random.default_rng(1234)

    data = {}
    eval_ids = []
    for name, scale, steps in (
        ("pretrain-700M", 1.0, range(1000, 9000, 1000)),
        ("pretrain-2B", 1.3, range(2000, 14000, 2000)),
    ):
        train = client.create_run(exp, run_name=name, tags={"atm.stage": "pretrain_stage1"})
        client.set_terminated(train.info.run_id)
        rows = _checkpoint_metrics(rng, steps, scale)
        run_id = _make_eval_run(client, exp, train.info.run_id, "pretrain_stage1",
                                list(zip(steps, rows)), f"evaluate-{name}")
        eval_ids.append(run_id)
        data[run_id] = rows
    # Distractors: an evaluate run of a fine-tuning stage, an unfinished pretrain evaluate run.
    ft = client.create_run(exp, run_name="ft", tags={"atm.stage": "finetune_massive"})
    client.set_terminated(ft.info.run_id)
    distract_rows = _checkpoint_metrics(rng, range(100, 600, 100), 0.5)
    distractor_ids = [
        _make_eval_run(client, exp, ft.info.run_id, "finetune_massive",
                       list(zip(range(100, 600, 100), distract_rows)), "evaluate-ft"),
        _make_eval_run(client, exp, eval_ids[0], "pretrain_stage2",
                       list(zip(range(100, 600, 100), distract_rows)), "evaluate-running",
                       finish=False),
    ]

    other = client.create_experiment("other", artifact_location=artifacts + "/other")
    lone = client.create_run(other, run_name="train-only", tags={"atm.stage": "pretrain_stage1"})
    client.set_terminated(lone.info.run_id)

    few = client.create_experiment("few", artifact_location=artifacts + "/few")
    _make_eval_run(client, few, lone.info.run_id, "pretrain_stage1",
                   list(zip([10, 20], _checkpoint_metrics(rng, [10, 20], 1.0))), "evaluate-few")

    return {
        "uri": uri,
        "root": root,
        "client": client,
        "exp_id": exp,
        "eval_ids": eval_ids,
        "data": data,
        "distractor_ids": distractor_ids,
        "training_id": client.get_run(eval_ids[0]).data.tags["atm.evaluated_run_id"],
    }


def _parse_table(stdout: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        if cells["scope"] == "pooled" and cells["language"] == "all":
            rows[cells["predictor"]] = cells
    return rows


def test_end_to_end_subprocess(store, tmp_path):
    out = tmp_path / "out"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "analysis/correlate_xnli.py", "--tracking-uri", store["uri"],
         "--out", str(out)],
        cwd=REPO, env=_env(), capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert time.time() - t0 < 60
    assert "skipped 1 unfinished evaluate run" in proc.stderr

    # Expected correlations, computed here on exactly the values logged for the 2 selected runs.
    pooled = [row for run_id in store["eval_ids"] for row in store["data"][run_id]]
    y = np.array([r[TARGET] for r in pooled])
    table = _parse_table(proc.stdout)
    assert set(table) == set(PREDICTORS)
    for short, key in PREDICTORS.items():
        x = np.array([r[key] for r in pooled])
        pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
        row = table[short]
        assert int(row["n"]) == 14
        assert float(row["pearson_r"]) == pytest.approx(pr.statistic, abs=1e-6)
        assert float(row["spearman_rho"]) == pytest.approx(sr.statistic, abs=1e-6)
        assert float(row["pearson_p"]) == pytest.approx(pr.pvalue, rel=5e-3)
        assert float(row["spearman_p"]) == pytest.approx(sr.pvalue, rel=5e-3)
    # Perplexity is lower-is-better: with this data it must anti-correlate with XNLI.
    assert float(table["perplexity_written"]["pearson_r"]) < -0.5

    # Files: full-precision CSVs, markdown, a valid PNG.
    corr = pd.read_csv(out / "correlations.csv")
    frame = pd.read_csv(out / "checkpoints.csv")
    assert len(frame) == 14
    assert set(frame["eval_run_id"]) == set(store["eval_ids"])
    assert {"step", TARGET, "eval/xnli/de/accuracy", *PREDICTORS.values()} <= set(frame.columns)
    x = np.array([r["eval/perplexity/written"] for r in pooled])
    got = corr.set_index("predictor").loc["perplexity_written"]
    assert got["pearson_r"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    # 3 probes against the XNLI average + en and de noun mask-filling against their own XNLI accuracy
    assert (out / "correlations.md").read_text().count("| pooled") == 5
    n = 14
    for short, key in PREDICTORS.items():  # Fisher-z intervals, written out by hand
        xs = np.array([r[key] for r in pooled])
        row = corr[(corr["predictor"] == short) & (corr["language"] == "all")].iloc[0]
        r, rho = stats.pearsonr(xs, y).statistic, stats.spearmanr(xs, y).statistic
        half = 1.959963984540054 / math.sqrt(n - 3)
        assert (row["pearson_lo"], row["pearson_hi"]) == (
            pytest.approx(math.tanh(math.atanh(r) - half)), pytest.approx(math.tanh(math.atanh(r) + half)))
        half_s = half * math.sqrt(1 + rho ** 2 / 2)  # Bonett & Wright (2000)
        assert (row["spearman_lo"], row["spearman_hi"]) == (
            pytest.approx(math.tanh(math.atanh(rho) - half_s)), pytest.approx(math.tanh(math.atanh(rho) + half_s)))
        assert f"[{row['pearson_lo']:.3f}, {row['pearson_hi']:.3f}]" in proc.stdout
    # per language: de noun mask-filling against de XNLI accuracy (not the average)
    de = corr[(corr["language"] == "de") & (corr["predictor"] == "mask_fill_noun_accuracy")].iloc[0]
    x_de = [r["eval/mask_fill/de/noun_accuracy"] for r in pooled]
    y_de = [r["eval/xnli/de/accuracy"] for r in pooled]
    assert de["target"] == "eval/xnli/de/accuracy" and de["n"] == 14
    assert de["pearson_r"] == pytest.approx(stats.pearsonr(x_de, y_de).statistic, abs=1e-12)
    png = (out / "scatter.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "scatter.png") as im:
        im.verify()
    assert not list(out.glob(".*.tmp"))

    # The analysis run in MLflow.
    client = store["client"]
    runs = client.search_runs(
        [store["exp_id"]],
        "tags.\"atm.stage\" = 'analysis' and tags.\"atm.analysis\" = 'correlate_xnli'",
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert set(run.data.tags["atm.consumed_run_ids"].split(",")) == set(store["eval_ids"])
    assert run.data.metrics["corr/pearson/perplexity_written"] == pytest.approx(
        float(stats.pearsonr(x, y).statistic), abs=1e-12)
    assert run.data.metrics["corr/n/perplexity_written"] == 14
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"correlations.md", "correlations.csv", "checkpoints.csv", "scatter.png", "per_language.png"}
    assert run.data.metrics["corr/pearson/mask_fill_noun_accuracy/de"] == pytest.approx(de["pearson_r"])
    assert run.data.metrics["corr/pearson_lo/perplexity_written"] < run.data.metrics["corr/pearson/perplexity_written"]


def test_empty_store_subprocess(tmp_path):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # initialise an empty store
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tracking-uri", uri, "--out", str(tmp_path / "o")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "experiment 'atm' not found" in proc.stderr
    assert "python -m atm.train stage=evaluate" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


# In-process error paths (main() is importable); MLflow is already imported here, so these are
# fast.


def _main(capsys, *argv):
    module = _load_script()
    rc = module.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_unknown_run_id(store, capsys, tmp_path):
    rc, _, err = _main(capsys, "--tracking-uri", store["uri"], "--run-id", "0" * 32,
                         "--out", str(tmp_path / "o"), "--no-log")
    assert rc == 2
    assert err == f"error: run id '{'0' * 32}' not found at {store['uri']}\n"


def test_training_run_id_points_to_its_evaluate_runs(store, capsys, tmp_path):
    rc, _, err = _main(capsys, "--tracking-uri", store["uri"], "--run-id", store["training_id"],
                       "--out", str(tmp_path / "o"), "--no-log")
    assert rc == 2
    assert "is not an evaluate run (atm.stage='pretrain_stage1')" in err
    assert store["eval_ids"][0] in err
    assert err.count("\n") == 1


def test_no_evaluate_runs(store, capsys, tmp_path):
    rc, _, err = _main(capsys, "--tracking-uri", store["uri"], "--experiment", "other",
                       "--out", str(tmp_path / "o"))
    assert rc == 2
    assert err == (
        f"error: no evaluate runs in experiment 'other' at {store['uri']}; "
        "run `python -m atm.train stage=evaluate ...` first\n"
    )


def test_too_few_checkpoints(store, capsys, tmp_path):
    rc, _, err = _main(capsys, "--tracking-uri", store["uri"], "--experiment", "few",
                       "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "found 2 checkpoint(s) with eval/xnli/avg_accuracy across 1 evaluate run(s)" in err
    assert err.count("\n") == 1


def test_missing_sqlite_file_is_not_created(capsys, tmp_path):
    db = tmp_path / "nope.db"
    rc, _, err = _main(capsys, "--tracking-uri", f"sqlite:///{db}", "--out", str(tmp_path / "o"))
    assert rc == 2
    assert "no MLflow store at" in err
    assert not db.exists()


def test_explicit_run_ids_per_run_no_log(store, capsys, tmp_path):
    """--run-id selects runs regardless of status; --per-run adds within-run rows; --no-log
    writes files but logs nothing."""
    client = store["client"]
    before = len(client.search_runs([store["exp_id"]], "tags.\"atm.stage\" = 'analysis'"))
    first = store["eval_ids"][0]
    rc, out, err = _main(capsys, "--tracking-uri", store["uri"], "--run-id", first,
                         "--per-run", "--no-log", "--out", str(tmp_path / "o"))
    assert rc == 0, err
    rows = [ln for ln in out.splitlines() if ln.startswith("| evaluate-pretrain-700M")]
    assert len(rows) == 5  # 3 overall probes + 2 per-language ones
    data = store["data"][first]
    x = [r["eval/perplexity/spoken"] for r in data]
    y = [r[TARGET] for r in data]
    corr = pd.read_csv(tmp_path / "o" / "correlations.csv")
    pooled = corr[(corr["scope"] == "pooled") & (corr["predictor"] == "perplexity_spoken")
                  & (corr["language"] == "all")]
    assert pooled["spearman_rho"].iloc[0] == pytest.approx(stats.spearmanr(x, y).statistic)
    assert pooled["n"].iloc[0] == 8
    after = len(client.search_runs([store["exp_id"]], "tags.\"atm.stage\" = 'analysis'"))
    assert after == before


def test_intervals_cover_the_true_correlation():
    """On 200 draws of a bivariate normal with correlation 0.6 both 95% intervals contain 0.6 (and the
    population Spearman correlation, 6/pi * arcsin(0.6 / 2) = 0.5829), and they narrow as n grows."""
    module = _load_script()
    rng = np.random.default_rng(7)
    xy = rng.multivariate_normal([0, 0], [[1, 0.6], [0.6, 1]], size=200)
    wide = module.correlate(xy[:20, 0], xy[:20, 1])
    out = module.correlate(xy[:, 0], xy[:, 1])
    assert out["pearson_lo"] < 0.6 < out["pearson_hi"]
    rho_s = 6 / math.pi * math.asin(0.3)
    assert out["spearman_lo"] < rho_s < out["spearman_hi"]
    assert out["pearson_hi"] - out["pearson_lo"] < wide["pearson_hi"] - wide["pearson_lo"]
    # n = 3: a correlation but no information about its interval
    three = module.correlate([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert (three["pearson_lo"], three["pearson_hi"], three["spearman_lo"], three["spearman_hi"]) == (-1, 1, -1, 1)


def test_degenerate_probes_are_left_out_and_constant_predictors_say_so(store, capsys, tmp_path):
    """Checkpoints whose XNLI probe misses a class are never correlated (counted in n_degenerate), per language
    by that language's flag; top-10 and MRR mask filling are predictors; a predictor at its floor is reported as
    constant, not as a silent nan; a table of nothing but undefined rows still exits 0."""
    client = store["client"]
    exp = client.create_experiment("degenerate", artifact_location=(store["root"] / "degenerate").as_uri())
    train = client.create_run(exp, run_name="teacher", tags={"atm.stage": "pretrain_stage1"})
    client.set_terminated(train.info.run_id)
    rows = []
    for i, step in enumerate(range(100, 900, 100)):
        flagged = i in (0, 1)  # the first two checkpoints: the probe never predicts "neutral" in de
        xnli = 0.34 + 0.01 * i + (0.004 if i % 2 else 0.0)
        rows.append((step, {
            TARGET: 0.60 if flagged else xnli,  # against the trend: would flip the correlation if kept
            "eval/xnli/en/accuracy": xnli, "eval/xnli/de/accuracy": 0.60 if flagged else xnli,
            "eval/xnli/en/degenerate": 0.0, "eval/xnli/de/degenerate": float(flagged),
            "eval/xnli/degenerate_languages": float(flagged),
            "eval/mask_fill/noun_accuracy": 0.0, "eval/mask_fill/noun_top10": 0.01 * i,
            "eval/mask_fill/noun_mrr": 0.002 * i + (0.001 if i == 5 else 0.0),
            "eval/mask_fill/de/noun_mrr": 0.002 * i, "eval/mask_fill/en/noun_mrr": 0.003 * i,
            "eval/perplexity/written": 100.0 - 5 * i}))
    _make_eval_run(client, exp, train.info.run_id, "pretrain_stage1", rows, "evaluate-degenerate")
    rc, out, err = _main(capsys, "--tracking-uri", store["uri"], "--experiment", "degenerate",
                         "--out", str(tmp_path / "o"), "--no-log")
    assert rc == 0, err
    assert "2 of 8 checkpoint(s) have a degenerate XNLI probe" in err
    corr = pd.read_csv(tmp_path / "o" / "correlations.csv", keep_default_na=False, na_values=["", "nan"])
    assert list(corr.columns[:len(CSV_HEAD)]) == CSV_HEAD  # the columns it always wrote come first, unchanged
    overall = corr[corr["language"] == "all"].set_index("predictor")
    kept = [r for i, (_, r) in enumerate(rows) if i >= 2]
    y = [r[TARGET] for r in kept]
    for predictor, key in (("mask_fill_noun_mrr", "eval/mask_fill/noun_mrr"),
                           ("mask_fill_noun_top10", "eval/mask_fill/noun_top10"),
                           ("perplexity_written", "eval/perplexity/written")):
        row = overall.loc[predictor]
        assert (row["n"], row["n_degenerate"]) == (6, 2)
        assert row["pearson_r"] == pytest.approx(stats.pearsonr([r[key] for r in kept], y).statistic)
        assert row["pearson_lo"] < row["pearson_r"] < row["pearson_hi"]
    noun = overall.loc["mask_fill_noun_accuracy"]
    assert math.isnan(noun["pearson_r"]) and noun["note"].startswith("constant predictor (0) over the 6 checkpoints")
    assert "constant predictor (0)" in out  # in the printed table, not only the CSV
    # per language: de loses its 2 flagged checkpoints, en keeps all 8
    per_lang = corr[corr["predictor"] == "mask_fill_noun_mrr"].set_index("language")
    assert (per_lang.loc["de", "n"], per_lang.loc["de", "n_degenerate"]) == (6, 2)
    assert (per_lang.loc["en", "n"], per_lang.loc["en", "n_degenerate"]) == (8, 0)
    frame = pd.read_csv(tmp_path / "o" / "checkpoints.csv")
    assert "step" in frame.columns and len(frame) == 8  # every checkpoint, flagged ones included

    # every checkpoint degenerate: nothing is correlated, every row says why, and the script still succeeds
    exp2 = client.create_experiment("all-degenerate", artifact_location=(store["root"] / "alldeg").as_uri())
    flagged_rows = [(step, {**values, "eval/xnli/degenerate_languages": 1.0}) for step, values in rows[:4]]
    _make_eval_run(client, exp2, train.info.run_id, "pretrain_stage1", flagged_rows, "evaluate-collapsed")
    rc, out, err = _main(capsys, "--tracking-uri", store["uri"], "--experiment", "all-degenerate",
                         "--out", str(tmp_path / "d"), "--no-log")
    assert rc == 0, err
    corr = pd.read_csv(tmp_path / "d" / "correlations.csv", keep_default_na=False, na_values=["", "nan"])
    pooled = corr[corr["language"] == "all"]
    assert pooled["pearson_r"].isna().all() and (pooled["n_degenerate"] == 4).all()
    assert pooled["note"].str.contains("have a degenerate XNLI probe").all()
