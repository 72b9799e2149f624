"""The AlexaTM/Distiller table scripts (analysis/scaling_table.py, stage2_effect.py, distillation_table.py,
ablation_report.py) on a throw-away SQLite MLflow store whose runs are recorded by atm's own tracking code
(``atm.tracking.start_run`` over configs composed from conf/, so params and lineage tags are the real ones)
with known metric values, so that every number in the tables can be checked by hand. The full fine-tunings log
``predictions/<locale>.jsonl`` whose intent accuracy and exact match are the logged ones (one seed, 100 utterances),
from which the tables draw their paired-bootstrap intervals."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient

from atm import tracking
from atm.lineage import compose_stage
from atm.stages.finetune import TAG_FROZEN, TAG_SETTING

REPO = Path(__file__).resolve().parent.parent
LOCALES = ["en-US", "de-DE"]
FT = ["finetune.locales=[en-US,de-DE]"]
# (intent accuracy, slot F1, exact match) per encoder, variant and locale
SCORES = {
    ("T1", False): {"en-US": (0.80, 0.70, 0.60), "de-DE": (0.75, 0.65, 0.55)},
    ("T2", False): {"en-US": (0.84, 0.73, 0.64), "de-DE": (0.78, 0.66, 0.58)},
    ("T1", True): {"en-US": (0.50, 0.40, 0.30), "de-DE": (0.45, 0.35, 0.25)},
    ("T2", True): {"en-US": (0.60, 0.44, 0.33), "de-DE": (0.40, 0.36, 0.27)},
    ("I", False): {"en-US": (0.70, 0.60, 0.50), "de-DE": (0.65, 0.55, 0.45)},
    ("F", False): {"en-US": (0.66, 0.55, 0.45), "de-DE": (0.60, 0.50, 0.35)},
    ("S", False): {"en-US": (0.60, 0.50, 0.40), "de-DE": (0.58, 0.45, 0.30)},
}
# Sweep trials: (logit loss, temperature, augment, objective); trial 6 is pruned, trial 7 failed.
TRIALS = [("kl", 1.0, "none", 10.0), ("kl", 2.0, "mask", 12.0), ("soft_ce", 1.0, "none", 14.0),
          ("soft_ce", 2.0, "mask", 18.0), ("kl", 4.0, "none", 11.0), ("soft_ce", 4.0, "mask", 16.0)]


def _start(cfg, consumed, parent=None, tags=None):
    return tracking.start_run(cfg, "0" * 16, consumed, parent, tags)


N_UTT = 100


def _predictions(scores: dict, rng) -> dict[str, str]:
    """``predictions/<locale>.jsonl`` text per locale (rows without ``seed``: the run's seed param) with exactly
    round(100 intent accuracy) right intents and round(100 exact match) utterances right in intent and slots, on
    a random set of utterance ids; every other utterance's slots are wrong."""
    out = {}
    for loc, (intent_acc, _, em) in scores.items():
        order = rng.permutation(N_UTT)
        n_intent, n_em = round(intent_acc * N_UTT), round(em * N_UTT)
        rows = []
        for rank, i in enumerate(order):
            gold = ["B-date", "O"]
            rows.append(json.dumps({"id": str(i), "utt": f"u{i}", "intent": "alarm_set",
                                    "pred_intent": "alarm_set" if rank < n_intent else "alarm_query",
                                    "slots": gold, "pred_slots": gold if rank < n_em else ["O", "O"]}))
        out[loc] = "\n".join(rows) + "\n"
    return out


def _massive_metrics(scores: dict) -> dict[str, float]:
    out = {}
    for loc, values in scores.items():
        for name, value in zip(("intent_accuracy", "slot_f1", "exact_match"), values):
            out[f"eval/massive/{loc}/{name}"] = value
            out[f"eval/massive/{loc}/{name}_se"] = math.sqrt(value * (1 - value) / 100)
        out[f"eval/massive/{loc}/n"] = 100.0
    for i, name in enumerate(("intent_accuracy", "slot_f1", "exact_match")):
        out[f"eval/massive/avg/{name}"] = sum(v[i] for v in scores.values()) / len(scores)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment 'atm': teachers T1 (Stage 1) -> T2 (Stage 2), students I (intermediate, teachers T1 then
    T2) -> F (final), a from-scratch model S with F's architecture, their finetune runs, an evaluate run of
    T1, and an 8-trial sweep; experiment 'other' holds only a tokenizer run."""
    root = tmp_path_factory.mktemp("analysis-tables")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    client.create_experiment("atm", artifact_location=(root / "artifacts").as_uri())
    client.create_experiment("other", artifact_location=(root / "other").as_uri())
    ids: dict[str, str] = {}
    try:
        mlflow.set_experiment("other")
        with _start(compose_stage("train_tokenizer", []), {}):
            pass
        mlflow.set_experiment("atm")
        models = [("T1", "pretrain_stage1", ["model=teacher_tiny"], {}),
                  ("T2", "pretrain_stage2", ["model=teacher_tiny"], {"init": "T1"}),
                  ("I", "distill_intermediate", [], {"teacher": "T1", "teacher_next": "T2"}),
                  ("F", "distill_final", [], {"teacher": "I"}),
                  ("S", "pretrain_stage1", ["model=student_tiny"], {})]
        sizes = {"T1": (810368, 1066368), "I": (300000, 400000), "F": (100000, 150000), "S": (100000, 150000)}
        for name, stage, overrides, inputs in models:
            with _start(compose_stage(stage, overrides), {r: ids[n] for r, n in inputs.items()}) as run:
                ids[name] = run.info.run_id
                mlflow.log_metrics({"eval/perplexity/written": 50.0, "eval/perplexity/spoken": 60.0})
                if name in sizes:  # T2 logs no size: the table computes it from its model.* params
                    mlflow.log_metrics({"cost/non_embedding_parameters": sizes[name][0],
                                        "cost/parameters": sizes[name][1]})
        with _start(compose_stage("evaluate", []), {"target": ids["T1"]},
                    tags={"atm.evaluated_run_id": ids["T1"], "atm.evaluated_stage": "pretrain_stage1"}) as run:
            ids["E1"] = run.info.run_id
            for step, xnli in ((2, 0.35), (4, 0.38), (6, 0.41)):
                mlflow.log_metrics({"eval/xnli/avg_accuracy": xnli, "eval/perplexity/written": 40.0 - step,
                                    "eval/mask_fill/noun_accuracy": 0.1 * step}, step=step)
        rng = np.random.default_rng(0)
        for (name, frozen), scores in SCORES.items():
            cfg = compose_stage("finetune", [*FT, f"finetune.freeze_encoder={str(frozen).lower()}"])
            with _start(cfg, {"encoder": ids[name]},
                        tags={TAG_SETTING: "full", TAG_FROZEN: str(frozen).lower()}) as run:
                ids[f"ft-{name}-{frozen}"] = run.info.run_id
                mlflow.log_metrics(_massive_metrics(scores), step=300)
                if not frozen:  # the frozen-encoder runs predate per-example predictions: no interval
                    for loc, text in _predictions(scores, rng).items():
                        mlflow.log_text(text, f"predictions/{loc}.jsonl")
        # A newer finetune run over S with another recipe: never the baseline of F's finetune run.
        with _start(compose_stage("finetune", [*FT, "trainer.max_steps=7"]), {"encoder": ids["S"]},
                    tags={TAG_SETTING: "full", TAG_FROZEN: "false"}):
            mlflow.log_metrics(_massive_metrics({loc: (0.99, 0.99, 0.99) for loc in LOCALES}), step=7)
        parent = tracking.sweep_parent(client.get_experiment_by_name("atm").experiment_id, "losses", None)
        ids["sweep"] = parent
        client.set_tag(parent, "optuna.direction", "minimize")
        extra = [("kl", 1.0, "none", 100.0, "PRUNED"), ("kl", 1.0, "none", None, "FAIL")]
        for number, (loss, temperature, augment, value, *state) in enumerate([*TRIALS, *extra]):
            cfg = compose_stage("distill_intermediate", [f"distill.logit.loss={loss}", f"augment={augment}",
                                                        f"distill.logit.temperature={temperature}"])
            tags = {tracking.TAG_SWEEP: "losses", tracking.TAG_TRIAL: str(number)}
            if state and state[0] == "PRUNED":
                tags["atm.trial_state"] = "PRUNED"
            try:
                with _start(cfg, {"teacher": ids["T1"]}, parent, tags):
                    if value is not None:
                        mlflow.log_metric("eval/perplexity/spoken", value)
                    if state and state[0] == "FAIL":
                        raise RuntimeError("trial crashed")
            except RuntimeError:
                pass
    finally:
        mlflow.set_tracking_uri(previous)
    return {"uri": uri, "root": root, "client": client, "ids": ids,
            "exp_id": client.get_experiment_by_name("atm").experiment_id}


def _env():
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("ATM_EXPERIMENT", None)
    return env


def _cli(script: str, store, out: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, f"analysis/{script}.py", "--tracking-uri", store["uri"],
                           "--out", str(out), *args], cwd=REPO, env=_env(), capture_output=True, text=True, check=False,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def _main(script: str, capsys, *argv: str):
    spec = importlib.util.spec_from_file_location(f"{script}_under_test", REPO / "analysis" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _analysis_run(store, name: str):
    runs = store["client"].search_runs([store["exp_id"]], f"tags.`atm.analysis` = '{name}'")
    assert len(runs) == 1
    return runs[0]


def _rel(score: float, base: float) -> float:
    """(err - err_base) / err_base with err = 1 - score, written out."""
    return ((1 - score) - (1 - base)) / (1 - base)


# --------------------------------------------------------------------------------------------- scaling


def test_scaling_table_cli(store, tmp_path):
    proc = _cli("scaling_table", store, tmp_path)
    frame = pd.read_csv(tmp_path / "scaling.csv")
    ids = store["ids"]
    # sorted by non-embedding size; a tie goes by stage order (pretrain before distill)
    assert list(frame["run_id"]) == [ids["S"], ids["F"], ids["I"], ids["T1"], ids["T2"]]
    rows = frame.set_index("run_id")
    # T2 logged no size: teacher_tiny (H=128, L=4, F=512) counted from its model.* params:
    # per layer 4H^2 + 2HF + 9H + F = 198272; 4 layers + embedding LN 2H + final LN 2H + LM head H^2+H+2H
    assert rows.loc[ids["T2"], "non_embedding_params"] == 4 * 198272 + 256 + 256 + 16384 + 128 + 256 == 810368
    assert rows.loc[ids["T2"], "size_source"] == "params" and rows.loc[ids["T1"], "size_source"] == "logged"
    assert math.isnan(rows.loc[ids["T2"], "parameters"]) and rows.loc[ids["T1"], "parameters"] == 1066368
    # intrinsic probes from T1's evaluate run at its last checkpoint (step 6), else the run's own perplexities
    assert rows.loc[ids["T1"], "xnli_accuracy"] == pytest.approx(0.41)
    assert rows.loc[ids["T1"], "perplexity_written"] == pytest.approx(34.0)
    assert rows.loc[ids["T1"], "mask_fill_noun_accuracy"] == pytest.approx(0.6)
    assert rows.loc[ids["T1"], "intrinsic_source"] == ids["E1"]
    assert rows.loc[ids["I"], "perplexity_written"] == 50.0 and math.isnan(rows.loc[ids["I"], "xnli_accuracy"])
    # MASSIVE: locale averages of the full fine-tuning; S's newer other-recipe run is the newest -> used here
    assert rows.loc[ids["T2"], "massive_exact_match"] == pytest.approx((0.64 + 0.58) / 2)
    assert rows.loc[ids["S"], "massive_exact_match"] == pytest.approx(0.99)
    assert rows.loc[ids["F"], "massive_intent_accuracy"] == pytest.approx((0.66 + 0.60) / 2)
    assert "| teacher_tiny" in proc.stdout and "810k" in proc.stdout
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = _analysis_run(store, "scaling_table")
    assert {a.path for a in store["client"].list_artifacts(run.info.run_id)} == {
        "scaling.md", "scaling.csv", "scaling_difference.csv", "scaling.png"}
    # largest minus smallest Stage-1 teacher: T1 (810k) - S (100k); S has no evaluate run, so only MASSIVE rows
    diff = pd.read_csv(tmp_path / "scaling_difference.csv").set_index("quantity")
    assert list(diff.index) == ["massive_intent_accuracy", "massive_slot_f1", "massive_exact_match"]
    assert set(diff["large_run_id"]) == {ids["T1"]} and set(diff["small_run_id"]) == {ids["S"]}
    for score, i in (("intent_accuracy", 0), ("exact_match", 2)):
        row = diff.loc[f"massive_{score}"]
        expected = np.mean([SCORES[("T1", False)][loc][i] - SCORES[("S", False)][loc][i] for loc in LOCALES])
        assert row["difference"] == pytest.approx(expected) == row["large"] - row["small"]
        assert row["ci_low"] < row["difference"] < row["ci_high"] and row["n"] == N_UTT
    assert run.data.metrics["scaling/pretrain_stage1/largest_minus_smallest/massive_intent_accuracy_lo"] == \
        pytest.approx(diff.loc["massive_intent_accuracy", "ci_low"])
    consumed = set(run.data.tags["atm.consumed_run_ids"].split(","))
    assert {ids["T1"], ids["E1"], ids["ft-T1-False"]} <= consumed
    assert ids["sweep"] not in consumed  # sweep trials are not encoders of the table by default


def test_scaling_table_frozen_and_stage_filter(store, tmp_path, capsys):
    rc, _, err = _main("scaling_table", capsys, "--tracking-uri", store["uri"], "--out", str(tmp_path),
                       "--frozen-encoder", "--stage", "pretrain_stage1", "pretrain_stage2", "--no-log")
    assert rc == 0, err
    frame = pd.read_csv(tmp_path / "scaling.csv").set_index("run_id")
    assert list(frame.index) == [store["ids"]["S"], store["ids"]["T1"], store["ids"]["T2"]]
    assert frame.loc[store["ids"]["T2"], "massive_slot_f1"] == pytest.approx((0.44 + 0.36) / 2)
    assert math.isnan(frame.loc[store["ids"]["S"], "massive_slot_f1"])  # S was never fine-tuned frozen


# ---------------------------------------------------------------------------------------------- stage 2


def test_stage2_effect_cli(store, tmp_path):
    proc = _cli("stage2_effect", store, tmp_path)
    frame = pd.read_csv(tmp_path / "stage2_effect.csv")
    assert len(frame) == 6  # (avg, en-US, de-DE) x (full, frozen encoder)
    for frozen in (False, True):
        s1, s2 = SCORES[("T1", frozen)], SCORES[("T2", frozen)]
        rows = frame[frame["encoder"] == ("frozen" if frozen else "fine-tuned")].set_index("locale")
        for loc in LOCALES:
            assert rows.loc[loc, "intent_rel_error_change"] == pytest.approx(_rel(s2[loc][0], s1[loc][0]))
            assert rows.loc[loc, "slot_rel_error_change"] == pytest.approx(_rel(s2[loc][1], s1[loc][1]))
            assert rows.loc[loc, "intent_err_stage1"] == pytest.approx(1 - s1[loc][0])
        avg1, avg2 = (s1["en-US"][0] + s1["de-DE"][0]) / 2, (s2["en-US"][0] + s2["de-DE"][0]) / 2
        assert rows.loc["avg", "intent_rel_error_change"] == pytest.approx(_rel(avg2, avg1))
    full = frame[frame["encoder"] == "fine-tuned"].set_index("locale")
    # en-US intent error 0.20 -> 0.16: a 20% relative error reduction
    assert full.loc["en-US", "intent_rel_error_change"] == pytest.approx(-0.20)
    assert " -20.00% |" in proc.stdout
    # paired-bootstrap intervals from the predictions (whose intent accuracies are the logged ones): they hold
    # the logged change; the avg row pools the locales and is narrower than either locale's
    s1, s2 = SCORES[("T1", False)], SCORES[("T2", False)]
    for loc in [*LOCALES, "avg"]:
        row = full.loc[loc]
        assert row["intent_rel_error_change_lo"] < row["intent_rel_error_change"] < row["intent_rel_error_change_hi"]
        assert row["n_examples"] == N_UTT and row["seeds_stage1"] == row["seeds_stage2"] == 1
    assert full.loc["de-DE", "intent_diff"] == pytest.approx(s2["de-DE"][0] - s1["de-DE"][0])
    width = lambda loc: full.loc[loc, "intent_diff_hi"] - full.loc[loc, "intent_diff_lo"]  # noqa: E731
    assert width("avg") < min(width("en-US"), width("de-DE"))
    assert f"[{full.loc['avg', 'intent_rel_error_change_lo']:+.2%}, " in proc.stdout
    frozen = frame[frame["encoder"] == "frozen"]
    assert frozen["intent_rel_error_change_lo"].isna().all()
    assert (frozen["interval_note"].str.contains("logged no predictions/<locale>.jsonl")).all()
    assert "warning: no interval: finetune run" in proc.stderr
    run = _analysis_run(store, "stage2_effect")
    assert run.data.metrics["stage2/full/frozen/de-DE/intent_rel_error_change"] == pytest.approx(
        _rel(0.40, 0.45))  # the frozen Stage-2 encoder is worse on de-DE intents: +9.09%
    assert run.data.metrics["stage2/full/fine-tuned/avg/intent_rel_error_change_hi"] == pytest.approx(
        full.loc["avg", "intent_rel_error_change_hi"])
    ids = store["ids"]
    assert set(run.data.tags["atm.consumed_run_ids"].split(",")) == {
        ids["T1"], ids["T2"], ids["ft-T1-False"], ids["ft-T2-False"], ids["ft-T1-True"], ids["ft-T2-True"]}


# ----------------------------------------------------------------------------------------- distillation


def test_distillation_table(store, tmp_path, capsys):
    rc, out, err = _main("distillation_table", capsys, "--tracking-uri", store["uri"], "--out", str(tmp_path))
    assert rc == 0, err
    frame = pd.read_csv(tmp_path / "distillation.csv", keep_default_na=False, na_values=["", "nan"])
    ids = store["ids"]
    rows = frame.set_index(["student_run_id", "baseline", "locale"])
    # F learned from I; I from T1 then T2 (teacher_next): each student is compared with its last teacher
    assert rows.loc[(ids["F"], "teacher", "avg"), "baseline_run_id"] == ids["I"]
    assert rows.loc[(ids["I"], "teacher", "avg"), "baseline_run_id"] == ids["T2"]
    # F's architecture is S's (student_tiny); S's same-recipe finetune run, not the newer max_steps=7 one
    assert rows.loc[(ids["F"], "scratch", "avg"), "baseline_finetune_run_id"] == ids["ft-S-False"]
    assert rows.loc[(ids["F"], "scratch", "de-DE"), "em_rel_error_change"] == pytest.approx(_rel(0.35, 0.30))
    assert rows.loc[(ids["F"], "teacher", "en-US"), "em_rel_error_change"] == pytest.approx(_rel(0.45, 0.50))
    assert rows.loc[(ids["I"], "teacher", "avg"), "em_rel_error_change"] == pytest.approx(
        _rel((0.50 + 0.45) / 2, (0.64 + 0.58) / 2))
    # no model of I's architecture was pretrained from scratch: nan with a note and a warning
    assert math.isnan(rows.loc[(ids["I"], "scratch", "avg"), "em_rel_error_change"])
    assert "no from-scratch run of this architecture" in err
    assert sum(line.startswith("| distill_") for line in out.splitlines()) == 4  # 2 students x 2 baselines
    # exact-match intervals from the predictions (their exact matches are the logged ones)
    f_scratch = rows.loc[(ids["F"], "scratch", "avg")]
    assert f_scratch["em_diff"] == pytest.approx(np.mean([0.45 - 0.40, 0.35 - 0.30]))
    assert f_scratch["em_rel_error_change_lo"] < f_scratch["em_rel_error_change"] < f_scratch["em_rel_error_change_hi"]
    assert f_scratch["n_examples"] == N_UTT
    assert math.isnan(rows.loc[(ids["I"], "scratch", "avg"), "em_rel_error_change_lo"])  # no baseline, no interval
    run = _analysis_run(store, "distillation_table")
    assert run.data.metrics["distill/distill_final/full/fine-tuned/vs_scratch/em_rel_error_change"] == \
        pytest.approx(_rel((0.45 + 0.35) / 2, (0.40 + 0.30) / 2))


# --------------------------------------------------------------------------------------------- ablation


def _hand_interval(values):
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def test_ablation_report_cli(store, tmp_path):
    proc = _cli("ablation_report", store, tmp_path)
    means = pd.read_csv(tmp_path / "marginal_means.csv").set_index(["dimension", "level"])
    importances = pd.read_csv(tmp_path / "importances.csv", keep_default_na=False,
                              na_values=["", "nan"]).set_index("dimension")
    # the pruned and the failed trial are left out; augment.probability/seed exist only under mask
    assert "6 counted, 1 pruned, 1 failed" in proc.stdout
    assert set(importances.index) == {"augment.name", "distill.logit.loss", "distill.logit.temperature"}
    assert importances.loc["augment.name", "same_as"] == "augment.probability, augment.seed"
    for dim, level, values in (("distill.logit.loss", "kl", [10.0, 12.0, 11.0]),
                               ("distill.logit.loss", "soft_ce", [14.0, 18.0, 16.0]),
                               ("augment.name", "mask", [12.0, 18.0, 16.0]),
                               ("distill.logit.temperature", "2", [12.0, 18.0])):
        mean, lo, hi = _hand_interval(values)
        row = means.loc[(dim, level)]
        assert (row["n"], row["mean"]) == (len(values), pytest.approx(mean))
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    # eta^2 of the loss: SS_between = 3 (11 - 13.5)^2 + 3 (16 - 13.5)^2 = 37.5 over SS_total = 47.5
    assert importances.loc["distill.logit.loss", "eta2"] == pytest.approx(37.5 / 47.5)
    # best minus worst level (minimised objective: kl, mean 11, is best; soft_ce, 16, worst) with Welch's
    # interval: variances 1 and 4 over 3 trials each, Welch-Satterthwaite degrees of freedom
    loss = importances.loc["distill.logit.loss"]
    assert (loss["best_level"], loss["worst_level"], loss["best_minus_worst"]) == ("kl", "soft_ce", pytest.approx(-5.0))
    se2 = 1 / 3 + 4 / 3
    dof = se2 ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2)
    from scipy import stats

    half = stats.t.ppf(0.975, dof) * math.sqrt(se2)
    assert (loss["bw_ci_low"], loss["bw_ci_high"]) == (pytest.approx(-5 - half), pytest.approx(-5 + half))
    assert next(iter(importances.index)) == "distill.logit.loss"  # the most important dimension first
    assert importances["optuna"].isna().all()  # no Optuna storage for this sweep
    assert "no Optuna storage" in proc.stderr
    trials = pd.read_csv(tmp_path / "trials.csv")
    assert sorted(trials["trial"]) == [0, 1, 2, 3, 4, 5]
    run = _analysis_run(store, "ablation_report")
    assert run.data.metrics["importance/eta2/losses/distill.logit.loss"] == pytest.approx(37.5 / 47.5)
    assert (tmp_path / "marginal_means.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ablation_report_bins_and_optuna_study(store, tmp_path, capsys):
    """A numeric dimension with more distinct values than --bins is cut into quantile bins; with the study's
    storage the Optuna importances (default evaluator) fill their column, the group choice ``augment`` mapped
    to the param ``augment.name``."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="losses", storage=storage)
    dists = {"distill.logit.loss": optuna.distributions.CategoricalDistribution(["kl", "soft_ce"]),
             "distill.logit.temperature": optuna.distributions.FloatDistribution(1.0, 4.0),
             "augment": optuna.distributions.CategoricalDistribution(["none", "mask"])}
    for loss, temperature, augment, value in TRIALS:
        study.add_trial(optuna.trial.create_trial(
            params={"distill.logit.loss": loss, "distill.logit.temperature": temperature, "augment": augment},
            distributions=dists, value=value))
    rc, _, err = _main("ablation_report", capsys, "--tracking-uri", store["uri"], "--out", str(tmp_path / "o"),
                         "--sweep", "losses", "--bins", "2", "--storage", storage, "--no-log")
    assert rc == 0, err
    means = pd.read_csv(tmp_path / "o" / "marginal_means.csv")
    temps = means[means["dimension"] == "distill.logit.temperature"]
    assert list(temps["n"]) == [4, 2]  # qcut at the median 1.5... -> {1, 1, 2, 2} | {4, 4}
    importances = pd.read_csv(tmp_path / "o" / "importances.csv").set_index("dimension")
    expected = optuna.importance.get_param_importances(study)
    assert importances.loc["augment.name", "optuna"] == pytest.approx(expected["augment"])
    assert importances.loc["distill.logit.loss", "optuna"] == pytest.approx(expected["distill.logit.loss"])


# ------------------------------------------------------------------------------------------------ errors


SCRIPTS = ["scaling_table", "stage2_effect", "distillation_table", "ablation_report", "correlate_xnli"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_run_id_one_line_error(store, script, capsys, tmp_path):
    rc, out, err = _main(script, capsys, "--tracking-uri", store["uri"], "--run-id", "f" * 32,
                         "--out", str(tmp_path / "o"))
    assert rc == 2 and out == ""
    assert err == f"error: run id '{'f' * 32}' not found at {store['uri']}\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script,message", [
    ("scaling_table", "no finished MLM training runs of stages pretrain_stage1"),
    ("stage2_effect", "no finished pretrain_stage2 runs"),
    ("distillation_table", "no finished distill_intermediate / distill_final run with a finetune run"),
    ("ablation_report", "no sweeps in experiment 'other'"),
])
def test_experiment_without_the_runs(store, script, message, capsys, tmp_path):
    rc, _, err = _main(script, capsys, "--tracking-uri", store["uri"], "--experiment", "other",
                       "--out", str(tmp_path / "o"))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("script,args,message", [
    ("stage2_effect", ["--run-id", "T1"], "is a 'pretrain_stage1' run; --run-id takes runs of stage pretrain_stage2"),
    ("distillation_table", ["--run-id", "T2"], "--run-id takes runs of stage distill_intermediate or distill_final"),
    ("ablation_report", ["--sweep", "nope"], "no sweep 'nope' in experiment 'atm'"),
    ("scaling_table", ["--run-id", "E1"], "is a 'evaluate' run"),
])
def test_wrong_selection(store, script, args, message, capsys, tmp_path):
    args = [store["ids"].get(a, a) for a in args]
    rc, _, err = _main(script, capsys, "--tracking-uri", store["uri"], *args, "--out", str(tmp_path / "o"))
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_stage2_effect_without_pairs(store, capsys, tmp_path):
    """A Stage-2 teacher whose Stage-1 teacher has no finetune run of the same recipe: one line naming both."""
    client = store["client"]
    cfg_run = client.get_run(store["ids"]["T2"])
    run = client.create_run(store["exp_id"], run_name="lonely-stage2",
                            tags={"atm.stage": "pretrain_stage2", "atm.input.init": store["ids"]["S"]})
    client.set_terminated(run.info.run_id)
    try:
        rc, _, err = _main("stage2_effect", capsys, "--tracking-uri", store["uri"], "--run-id", run.info.run_id,
                           "--out", str(tmp_path / "o"))
    finally:
        client.delete_run(run.info.run_id)
    assert rc == 2 and err.count("\n") == 1
    assert f"{run.info.run_id} (lonely-stage2): 0 finetune run(s) over it, 2 over its Stage-1 teacher" in err
    assert cfg_run.data.tags["atm.stage"] == "pretrain_stage2"
