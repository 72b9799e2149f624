"""analysis/findings.py (and the paired intervals of analysis/_examples.py, the TF-IDF baseline) on a throw-away
SQLite MLflow store whose runs follow the per-example contracts: finetune runs log ``predictions/<locale>.jsonl``
(seed, id, utt, intent, pred_intent, slots, pred_slots), evaluate runs log per-checkpoint metrics with the XNLI
``degenerate`` flags, a sweep logs its ablation trials.

Planted effects: Stage 2 fixes many intent and slot errors of Stage 1 (F2: reproduced); the final student is its
same-size from-scratch model with 6 examples fixed and 5 broken (F3: a null effect, inconclusive); the largest
teacher has lower perplexity (F4a: reproduced) but worse intent accuracy (F4b: contradicted); perplexity falls as
XNLI rises over the non-degenerate checkpoints (F1a: reproduced), while mask filling sits at its floor (F1b: a
constant predictor); the intermediate objective drives the ablation and MI-alpha is best (F5: reproduced)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")
from conftest import mlflow_store
from mlflow.entities import Metric, Param

from analysis import _examples as examples
from analysis._store import RunIndex
from atm import metrics as M
from atm import stats
from atm.tracking import TAG_TRIAL

REPO = Path(__file__).resolve().parent.parent
LOCALES = ("en-US", "de-DE")
SEEDS = (0, 1, 2)
N_UTT = 240
RECIPE = {"finetune.locales": "[en-US, de-DE]", "finetune.max_train_per_locale": "400", "trainer.max_steps": "500",
          "seed": "0"}
SMALL_ARCH = {"model.hidden_size": "64", "model.num_hidden_layers": "2", "model.num_attention_heads": "2",
              "model.intermediate_size": "256"}
LARGE_ARCH = {"model.hidden_size": "128", "model.num_hidden_layers": "4", "model.num_attention_heads": "4",
              "model.intermediate_size": "512"}
GOLD_SLOTS = (["B-date", "I-date", "O", "B-time"], ["O", "B-place", "O", "O"], ["O", "O", "O", "O"])


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", REPO / "analysis" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ planting


def _gold(i: int) -> tuple[str, list[str]]:
    return f"intent_{i % 7}", list(GOLD_SLOTS[i % 3])


def _predict(rng, p_intent: float, p_slots: float) -> dict[tuple[str, int, int], tuple[str, list[str]]]:
    """Predictions per (locale, seed, utterance): intent right with p_intent, slots all right with p_slots
    (else every tag O)."""
    out = {}
    for loc in LOCALES:
        for seed in SEEDS:
            for i in range(N_UTT):
                intent, slots = _gold(i)
                out[(loc, seed, i)] = (intent if rng.random() < p_intent else "wrong",
                                       slots if rng.random() < p_slots else ["O"] * len(slots))
    return out


def _flip(preds, n_fixed: int, n_broken: int):
    """A copy with the first ``n_fixed`` not-exact-match utterances made right and the first ``n_broken``
    exact-match ones given a wrong intent, in every (locale, seed)."""
    out = dict(preds)
    for loc in LOCALES:
        for seed in SEEDS:
            fixed = broken = 0
            for i in range(N_UTT):
                intent, slots = out[(loc, seed, i)]
                right = (intent, slots) == _gold(i)
                if not right and fixed < n_fixed:
                    out[(loc, seed, i)] = _gold(i)
                    fixed += 1
                elif right and broken < n_broken:
                    out[(loc, seed, i)] = ("wrong", slots)
                    broken += 1
    return out


def _scores(preds, loc: str) -> dict[str, float]:
    """Mean over seeds of MASSIVE's scores (what the finetune stage logs)."""
    per_seed = []
    for seed in SEEDS:
        gold = [_gold(i) for i in range(N_UTT)]
        pred = [preds[(loc, seed, i)] for i in range(N_UTT)]
        args = ([p[0] for p in pred], [g[0] for g in gold], [p[1] for p in pred], [g[1] for g in gold])
        per_seed.append((M.intent_accuracy(*args[:2]), M.slot_f1(args[2], args[3]), M.exact_match(*args)))
    return dict(zip(("intent_accuracy", "slot_f1", "exact_match"), np.mean(per_seed, axis=0)))


def _create(client, exp, name, stage, params=None, tags=None, metrics=None, steps=None):
    run = client.create_run(exp, run_name=name, tags={"atm.stage": stage, **(tags or {})})
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    for i, (step, values) in enumerate(steps or []):
        batch += [Metric(k, float(v), now + i + 1, step) for k, v in values.items()]
    client.log_batch(run.info.run_id, metrics=batch, params=[Param(k, v) for k, v in (params or {}).items()])
    return run.info.run_id


def _finetune(client, exp, name, encoder_id, preds, with_predictions=True):
    metrics = {}
    for loc in LOCALES:
        metrics.update({f"eval/massive/{loc}/{k}": v for k, v in _scores(preds, loc).items()})
        metrics[f"eval/massive/{loc}/n"] = N_UTT
    for score in ("intent_accuracy", "slot_f1", "exact_match"):
        metrics[f"eval/massive/avg/{score}"] = np.mean([metrics[f"eval/massive/{loc}/{score}"] for loc in LOCALES])
    run_id = _create(client, exp, name, "finetune", RECIPE, {
        "atm.input.encoder": encoder_id, "atm.finetune.setting": "full", "atm.finetune.freeze_encoder": "false"},
        metrics)
    if with_predictions:
        for loc in LOCALES:
            rows = []
            for seed in SEEDS:
                for i in range(N_UTT):
                    intent, slots = _gold(i)
                    pred_intent, pred_slots = preds[(loc, seed, i)]
                    rows.append(json.dumps({"seed": seed, "id": str(1000 + i), "utt": f"utterance {i}",
                                            "intent": intent, "pred_intent": pred_intent, "slots": slots,
                                            "pred_slots": pred_slots}))
            client.log_text(run_id, "\n".join(rows) + "\n", f"predictions/{loc}.jsonl")
    client.set_terminated(run_id)
    return run_id


def _checkpoints(rng, scale: float, degenerate_steps=(0,)):
    """Evaluate-run steps: XNLI rises and written perplexity falls with the step; noun mask filling at its floor
    (0); at ``degenerate_steps`` the probe misses a class (high XNLI *and* high perplexity, against the trend)."""
    rows = []
    for step in range(0, 700, 100):
        progress = step / 600
        degenerate = step in degenerate_steps
        xnli = 0.55 if degenerate else 0.34 + 0.10 * progress * scale + rng.normal(0, 0.004)
        rows.append((step, {"eval/xnli/avg_accuracy": xnli, "eval/xnli/en/accuracy": xnli,
                            "eval/xnli/en/degenerate": float(degenerate),
                            "eval/xnli/degenerate_languages": float(degenerate),
                            "eval/perplexity/written": (400.0 if degenerate else 300 - 150 * progress * scale
                                                        + rng.normal(0, 4)),
                            "eval/mask_fill/noun_accuracy": 0.0,
                            "eval/perplexity/written/en": (300 - 150 * progress * scale) * 1.1,
                            "eval/perplexity/written/de": (300 - 150 * progress * scale) * 1.3,
                            "eval/perplexity/spoken/en-US": (200 - 80 * progress * scale) * 0.9,
                            "eval/perplexity/spoken/de-DE": (200 - 80 * progress * scale) * 1.2}))
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("findings")
    uri, client, exp = mlflow_store(root)
    rng = np.random.default_rng(11)
    ids = {}
    sizes = {"S": 1e5, "L": 8e5}
    ids["S"] = _create(client, exp, "teacher-S", "pretrain_stage1", SMALL_ARCH,
                       metrics={"cost/non_embedding_parameters": sizes["S"]})
    ids["L"] = _create(client, exp, "teacher-L", "pretrain_stage1", LARGE_ARCH,
                       metrics={"cost/non_embedding_parameters": sizes["L"]})
    ids["L2"] = _create(client, exp, "teacher-L-stage2", "pretrain_stage2", LARGE_ARCH, {"atm.input.init": ids["L"]},
                        metrics={"cost/non_embedding_parameters": sizes["L"]})
    ids["F"] = _create(client, exp, "student-final", "distill_final", SMALL_ARCH, {"atm.input.teacher": ids["L2"]},
                       metrics={"cost/non_embedding_parameters": sizes["S"]})
    for key in ("S", "L", "L2", "F"):
        client.set_terminated(ids[key])
    for name, teacher, scale in (("S", ids["S"], 0.8), ("L", ids["L"], 1.2)):
        ids[f"E-{name}"] = _create(client, exp, f"evaluate-{name}", "evaluate", tags={
            "atm.evaluated_run_id": teacher, "atm.evaluated_stage": "pretrain_stage1"},
            steps=_checkpoints(rng, scale))
        client.set_terminated(ids[f"E-{name}"])
    stage1 = _predict(rng, 0.70, 0.60)
    scratch = _predict(rng, 0.80, 0.70)
    ids["ft-L"] = _finetune(client, exp, "ft-L", ids["L"], stage1)
    ids["ft-L2"] = _finetune(client, exp, "ft-L2", ids["L2"], _flip(stage1, 40, 0))
    ids["ft-S"] = _finetune(client, exp, "ft-S", ids["S"], scratch)
    ids["ft-F"] = _finetune(client, exp, "ft-F", ids["F"], _flip(scratch, 6, 5))
    parent = _create(client, exp, "sweep", "sweep", tags={"atm.sweep_parent": "alexatm_mini_ablation",
                                                          "optuna.direction": "minimize"})
    ids["sweep"] = parent
    trial = 0
    for inter, base in (("hidden_mse", 30.0), ("infonce", 26.0), ("mi_alpha", 20.0)):
        for logit, shift in (("soft_ce", 0.0), ("kl", 0.4), ("logit_mse", 0.8)):
            run_id = _create(client, exp, f"trial-{trial}", "distill_intermediate",
                             {"stage.objective": "eval/perplexity/spoken", "distill.logit.loss": logit,
                              "distill.intermediate.loss": inter},
                             {"atm.sweep": "alexatm_mini_ablation", "mlflow.parentRunId": parent,
                              TAG_TRIAL: str(trial)},
                             {"eval/perplexity/spoken": base + shift + rng.normal(0, 0.3)})
            client.set_terminated(run_id)
            trial += 1
    client.set_terminated(parent)
    # Experiment "old": the F2 runs, logged before the per-example contract (no predictions artifacts).
    old = client.create_experiment("old", artifact_location=(root / "old").as_uri())
    s1 = _create(client, old, "old-L", "pretrain_stage1", LARGE_ARCH)
    s2 = _create(client, old, "old-L2", "pretrain_stage2", LARGE_ARCH, {"atm.input.init": s1})
    for run_id in (s1, s2):
        client.set_terminated(run_id)
    _finetune(client, old, "old-ft-L", s1, stage1, with_predictions=False)
    _finetune(client, old, "old-ft-L2", s2, stage1, with_predictions=False)
    client.create_experiment("empty", artifact_location=(root / "empty").as_uri())
    return {"uri": uri, "client": client, "exp": exp, "ids": ids, "root": root, "stage1": stage1,
            "scratch": scratch}


def _findings(store, experiment="atm"):
    findings = _load("findings")
    index = RunIndex(store["client"], store["client"].get_experiment_by_name(experiment), store["uri"])
    return findings.findings_frame(findings.Context(index)).set_index("finding")


# --------------------------------------------------------------------------------------------------- tests


def test_paired_intervals_match_the_scores_the_runs_logged(store):
    """The paired comparison's point estimates are the logged scores' differences and relative error
    changes (pooled = mean over locales), and slot F1 is seqeval's."""
    client, ids = store["client"], store["ids"]
    artifacts = examples.Artifacts(client)
    ft2, ft1 = client.get_run(ids["ft-L2"]), client.get_run(ids["ft-L"])
    comparisons, note = examples.compare_finetunes(artifacts, ft2, ft1, ["intent_accuracy", "slot_f1"],
                                                   per_locale=True)
    assert note == "" and set(comparisons) == {"avg", *LOCALES}
    for score in ("intent_accuracy", "slot_f1"):
        a = np.mean([ft2.data.metrics[f"eval/massive/{loc}/{score}"] for loc in LOCALES])
        b = np.mean([ft1.data.metrics[f"eval/massive/{loc}/{score}"] for loc in LOCALES])
        pooled = comparisons["avg"]
        assert pooled.difference[score].estimate == pytest.approx(a - b)
        assert pooled.relative[score].estimate == pytest.approx(((1 - a) - (1 - b)) / (1 - b))
        assert pooled.relative[score].lo < pooled.relative[score].estimate < pooled.relative[score].hi
        de = ft2.data.metrics[f"eval/massive/de-DE/{score}"] - ft1.data.metrics[f"eval/massive/de-DE/{score}"]
        assert comparisons["de-DE"].difference[score].estimate == pytest.approx(de)
    assert comparisons["avg"].n == N_UTT and comparisons["avg"].seeds_a == SEEDS
    # pooling two locales narrows the interval against one locale alone
    one = comparisons["en-US"].difference["intent_accuracy"]
    both = comparisons["avg"].difference["intent_accuracy"]
    assert both.hi - both.lo < one.hi - one.lo


def test_relative_change_interval_is_the_bootstrap_of_the_ratio():
    """The relative error change's interval equals the percentile interval of (err_a - err_b) / err_b computed
    in each resample (here by resampling by hand with atm.stats' generator and layout)."""
    rng = np.random.default_rng(5)
    n = 400
    frame = lambda p: pd.DataFrame({"stratum": "en-US", "id": [str(i) for i in range(n)], "seed": 0,  # noqa: E731
                                    "intent_correct": (rng.random(n) < p).astype(int)})
    a, b = frame(0.85), frame(0.75)
    aligned = examples.align(a, b, ["intent_correct"])
    _, relative = examples.paired_intervals(aligned, "mean")
    # the same resamples atm.stats.paired_bootstrap draws: one generator, examples then (single) seeds
    gen = np.random.default_rng(0)
    idx = gen.integers(0, n, size=(stats.N_RESAMPLES, n))
    err_a = 1 - aligned.a[0, :, 0][idx].mean(axis=1)
    err_b = 1 - aligned.b[0, :, 0][idx].mean(axis=1)
    lo, hi = np.quantile((err_a - err_b) / err_b, [0.025, 0.975])
    assert (relative.lo, relative.hi) == (pytest.approx(lo, rel=1e-3), pytest.approx(hi, rel=1e-3))


def test_planted_effects_get_their_verdicts(store):
    table = _findings(store)
    ids = store["ids"]
    assert list(table.index) == ["F1a", "F1b", "F2a", "F2b", "F3", "F4a", "F4b", "F5a", "F5b"]
    # a real effect: Stage 2 fixes 40 of each seed's ~100 intent errors per locale
    for finding in ("F2a", "F2b"):
        row = table.loc[finding]
        assert row["verdict"] == "reproduced" and row["ci_high"] < 0 and math.isnan(row["required_n"])
        assert set(row["run_ids"].split(",")) == {ids["L2"], ids["L"], ids["ft-L2"], ids["ft-L"]}
    ft2, ft1 = store["client"].get_run(ids["ft-L2"]), store["client"].get_run(ids["ft-L"])
    a = np.mean([ft2.data.metrics[f"eval/massive/{loc}/intent_accuracy"] for loc in LOCALES])
    b = np.mean([ft1.data.metrics[f"eval/massive/{loc}/intent_accuracy"] for loc in LOCALES])
    assert table.loc["F2a", "estimate"] == pytest.approx((b - a) / (1 - b))
    # a null effect: 6 exact matches fixed and 5 broken per (locale, seed) out of 240
    f3 = table.loc["F3"]
    assert f3["verdict"] == "inconclusive" and f3["ci_low"] < 0 < f3["ci_high"]
    assert math.isfinite(f3["required_n"]) and f3["required_n"] > N_UTT and f3["unit"] == "test utterances per locale"
    assert set(f3["run_ids"].split(",")) == {ids["F"], ids["S"], ids["ft-F"], ids["ft-S"]}
    # a reversed effect: the larger teacher is worse on intents (0.70 vs 0.80) but lower in perplexity
    assert table.loc["F4b", "verdict"] == "contradicted" and table.loc["F4b", "ci_high"] < 0
    assert math.isnan(table.loc["F4b", "required_n"])
    f4a = table.loc["F4a"]
    assert f4a["verdict"] == "reproduced" and f4a["n"] == 4 and f4a["unit"] == "languages"
    # at the last checkpoint (step 600): ratios large/small are (300-180)/(300-120) written, (200-96)/(200-64) spoken
    expected = math.exp(np.mean([math.log(120 / 180)] * 2 + [math.log(104 / 136)] * 2)) - 1
    assert f4a["estimate"] == pytest.approx(expected)
    # F1: the 2 degenerate checkpoints (against the trend) are left out; mask filling at its floor is constant
    f1a = table.loc["F1a"]
    assert f1a["verdict"] == "reproduced" and f1a["n"] == 12 and f1a["estimate"] < -0.9
    assert "2 checkpoint(s) with a degenerate XNLI probe left out" in f1a["note"]
    assert set(f1a["run_ids"].split(",")) == {ids["E-S"], ids["E-L"]}
    f1b = table.loc["F1b"]
    assert f1b["verdict"] == "inconclusive" and "constant predictor" in f1b["note"] and f1b["atm_figure"] == "n/a"
    # F5: the intermediate objective explains most of the variance, MI-alpha is the best (lowest perplexity)
    assert table.loc["F5a", "verdict"] == "reproduced" and table.loc["F5a", "estimate"] > 0.8
    assert table.loc["F5b", "verdict"] == "reproduced"
    others = np.mean([30.4, 26.4])  # level means: base + the mean logit shift 0.4 (noise sd 0.3 / sqrt 3)
    assert table.loc["F5b", "estimate"] == pytest.approx((others - 20.4) / others, abs=0.03)
    assert len(table.loc["F5a", "run_ids"].split(",")) == 10  # the sweep and its 9 trials


def test_verdict_rule_and_required_n():
    findings = _load("findings")
    iv = stats.Interval
    assert findings.verdict(iv(-0.1, -0.2, -0.01, 100), -1) == "reproduced"
    assert findings.verdict(iv(-0.1, -0.2, -0.01, 100), +1) == "contradicted"
    assert findings.verdict(iv(0.05, -0.01, 0.11, 100), +1) == "inconclusive"
    assert findings.verdict(iv(0.05, math.nan, math.nan, 1), +1) == "inconclusive"
    assert findings.verdict(None, +1) == "inconclusive"
    # half-width 0.06 at n = 100 -> se 0.0306; detecting 0.05 at 80% power needs 100 (2.80 * 0.0306 / 0.05)^2
    needed = findings.required_sample(findings.Measure(iv(0.05, -0.01, 0.11, 100)))
    assert needed == math.ceil(100 * (2.8016 * (0.06 / 1.95996) / 0.05) ** 2)
    # a Fisher-z interval: r = 0.3 over 20 checkpoints needs ((z_a + z_b) / atanh 0.3)^2 + 3 checkpoints
    z, half = math.atanh(0.3), 1.959964 / math.sqrt(17)
    fisher = findings.Measure(iv(0.3, math.tanh(z - half), math.tanh(z + half), 20), iv(z, z - half, z + half, 17), 3.0)
    assert findings.required_sample(fisher) == math.ceil((2.8016 / z) ** 2 + 3)


def test_missing_runs_name_their_jobs(store):
    table = _findings(store, "empty")
    assert set(table["verdict"]) == {"missing"}
    assert "experiment/alexatm_mini_jobs@_global_=ft_stage2_l" in table.loc["F2a", "job"]
    assert "eval_stage1_l" in table.loc["F1a", "job"] and "ft_final" in table.loc["F3", "job"]
    assert "+sweep=alexatm_mini_ablation" in table.loc["F5a", "job"]
    old = _findings(store, "old")  # the F2 runs exist but predate the per-example predictions
    assert old.loc["F2a", "verdict"] == "missing" and "logged no predictions/<locale>.jsonl" in old.loc["F2a", "note"]
    assert len(old.loc["F2a", "run_ids"].split(",")) == 4


def test_script_subprocess_writes_csv_png_and_logs(store, tmp_path, data_env):
    out = tmp_path / "out"
    env = {k: v for k, v in data_env.items() if k != "ATM_EXPERIMENT"}
    proc = subprocess.run([sys.executable, "analysis/findings.py", "--tracking-uri", store["uri"], "--out", str(out),
                           "--baseline-max-train", "300"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(out / "findings.csv").set_index("finding")
    assert frame.loc["F2b", "verdict"] == "reproduced" and frame.loc["F4b", "verdict"] == "contradicted"
    assert (out / "findings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| F3 " in proc.stdout and "inconclusive" in proc.stdout
    # the baseline next to the largest teacher's en-US intent accuracy (teacher-L-stage2, ft-L2)
    assert "| TF-IDF + logistic regression (300 training utterances) | " in proc.stdout and "| teacher-L-stage2 (pretrain_stage2" in proc.stdout
    client = store["client"]
    runs = client.search_runs([store["exp"]], "tags.`atm.analysis` = 'findings'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["verdict/F3"] == "inconclusive"
    assert run.data.metrics["findings/F2a/ci_high"] < 0
    assert 0.3 < run.data.metrics["baseline/tfidf_logreg/en-US/intent_accuracy"] < 1
    assert {store["ids"]["ft-L2"], store["ids"]["sweep"]} <= set(run.data.tags["atm.consumed_run_ids"].split(","))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"findings.md", "findings.csv", "findings.png"}


def test_missing_experiment_is_an_error_and_everything_missing_exits_0(store, tmp_path, capsys):
    findings = _load("findings")
    rc = findings.main(["--tracking-uri", store["uri"], "--experiment", "nope", "--out", str(tmp_path / "o")])
    assert rc == 2 and "experiment 'nope' not found" in capsys.readouterr().err
    rc = findings.main(["--tracking-uri", store["uri"], "--experiment", "empty", "--out", str(tmp_path / "e"),
                        "--no-log", "--no-baseline"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("| missing ") == 9


def test_tfidf_baseline_on_real_data(real_data_env):
    """Trained on 600 en-US utterances, the baseline is far above the majority class (about 0.07 of the test
    split) and below the full-data accuracy (0.85); the test split is scored whole."""
    baseline = _load("baseline_tfidf")
    result = baseline.tfidf_intent_baseline("en-US", max_train=600)
    assert result.n_test == 2974 and result.n_train == 600
    acc = result.accuracy
    assert 0.45 < acc.estimate < 0.8 and acc.lo < acc.estimate < acc.hi and acc.hi - acc.lo < 0.05
    assert result.seconds > 0
    from atm.errors import AtmError

    with pytest.raises(AtmError, match="unknown MASSIVE locale 'xx-YY'"):
        baseline.tfidf_intent_baseline("xx-YY")
