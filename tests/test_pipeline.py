"""End to end through the real CLI on real data: every stage on a tiny config, lineage reuse, a 3-trial
sweep with nested MLflow runs and an Optuna study, checkpoint evaluation and the correlation script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, atm_train, trained_store


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_env):
    """A working directory whose MLflow store holds the whole chain, trained by one `stage=finetune` call."""
    return trained_store(tmp_path_factory, data_env, "pipeline", ["stage=finetune", *TINY])


def _client(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")


def _runs(cwd: Path, stage: str | None = None):
    client = _client(cwd)
    exp = client.get_experiment_by_name("atm")
    flt = f"tags.`atm.stage` = '{stage}'" if stage else ""
    return client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000)


def test_every_stage_ran_once_with_lineage(store):
    chain = ["train_tokenizer", "pretrain_stage1", "pretrain_stage2", "distill_intermediate", "distill_final",
             "finetune"]
    runs = {stage: _runs(store, stage) for stage in chain}
    assert {stage: len(r) for stage, r in runs.items()} == {stage: 1 for stage in chain}
    ids = {stage: r[0].info.run_id for stage, r in runs.items()}
    # AlexaTM: the intermediate student learns from the Stage-1 teacher, then from the Stage-2 teacher
    roles = {"pretrain_stage1": {"tokenizer_run": "train_tokenizer"}, "pretrain_stage2": {"init": "pretrain_stage1"},
             "distill_intermediate": {"teacher": "pretrain_stage1", "teacher_next": "pretrain_stage2"},
             "distill_final": {"teacher": "distill_intermediate"}, "finetune": {"encoder": "distill_final"}}
    for stage, inputs in roles.items():
        tags = runs[stage][0].data.tags
        for role, upstream in inputs.items():
            assert tags[f"atm.input.{role}"] == ids[upstream]
        assert tags["atm.consumed_run_ids"] == ",".join(ids[u] for u in inputs.values())
        assert len(tags["atm.config_hash"]) == 16
    assert runs["distill_intermediate"][0].data.metrics["distill/switch_step"] == 4  # distill.switch.steps=3
    for stage in chain:
        run = runs[stage][0]
        assert run.info.status == "FINISHED"
        assert run.data.params["stage.name"] == stage
    # metrics with steps, checkpoints and tokenizer as artifacts
    client = _client(store)
    s1 = runs["pretrain_stage1"][0]
    assert [m.step for m in client.get_metric_history(s1.info.run_id, "train/loss")] == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(s1.info.run_id)}
    assert {"checkpoints", "config.yaml"} <= artifacts and "checkpoint" not in artifacts  # final: a logged model
    model = client.get_logged_model(s1.data.tags["atm.model_id"])
    ckpt = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= ckpt
    assert "tokenizer/en/split_ratio" in runs["train_tokenizer"][0].data.metrics
    ft = runs["finetune"][0].data.metrics
    for key in ("intent_accuracy", "slot_f1", "exact_match"):
        assert 0.0 <= ft[f"eval/massive/en-US/{key}"] <= 1.0
    assert 0.0 <= runs["distill_final"][0].data.metrics["eval/perplexity/spoken"]


def test_lineage_reuse_trains_nothing_twice(store, data_env):
    before = {r.info.run_id for r in _runs(store)}
    result = atm_train(["stage=distill_final", *TINY], store, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    new = [r for r in _runs(store) if r.info.run_id not in before]
    assert [r.data.tags["atm.stage"] for r in new] == ["distill_final"]
    # the same teacher as the first distill_final run
    old = [r for r in _runs(store, "distill_final") if r.info.run_id in before][0]
    assert new[0].data.tags["atm.input.teacher"] == old.data.tags["atm.input.teacher"]
    assert new[0].data.tags["atm.config_hash"] == old.data.tags["atm.config_hash"]


def test_sweep_three_trials_nested_and_study(store, data_env):
    before = {r.info.run_id for r in _runs(store)}
    result = atm_train(["-m", "+sweep=distill_losses", "hydra.sweeper.n_trials=3", *TINY], store, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    new = [r for r in _runs(store) if r.info.run_id not in before]
    parents = [r for r in new if r.data.tags.get("atm.sweep_parent") == "distill_losses"]
    trials = [r for r in new if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(trials) == 3
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parents[0].info.run_id}
    assert {r.data.tags["atm.stage"] for r in trials} == {"distill_intermediate"}
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trials) == [0, 1, 2]
    assert all("eval/perplexity/spoken" in r.data.metrics for r in trials)
    assert len(new) == 4  # no teacher was trained again
    import optuna

    study = optuna.load_study(study_name="distill_losses", storage=f"sqlite:///{store / 'optuna.db'}")
    assert len(study.trials) == 3
    best = min(r.data.metrics["eval/perplexity/spoken"] for r in trials)
    assert study.best_value == pytest.approx(best)
    assert parents[0].data.tags["sweep.best_trial"] == str(study.best_trial.number)


def test_evaluate_checkpoints_and_correlation(store, data_env):
    result = atm_train(["stage=evaluate", "target=stage1", *TINY], store, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = _runs(store, "evaluate")[0]
    s1 = _runs(store, "pretrain_stage1")[0]
    assert run.data.tags["atm.evaluated_run_id"] == s1.info.run_id
    history = _client(store).get_metric_history(run.info.run_id, "eval/xnli/avg_accuracy")
    assert sorted(m.step for m in history) == [2, 4, 6]
    for key in ("eval/perplexity/written", "eval/mask_fill/en/noun_accuracy", "eval/xnli/de/accuracy"):
        assert key in run.data.metrics
    out = subprocess.run([sys.executable, str(REPO / "analysis" / "correlate_xnli.py"), "--out", "corr"],
                         cwd=store, env=data_env, capture_output=True, text=True, timeout=300)
    # A 6-step tiny teacher may predict one XNLI class at every checkpoint; then the correlation is
    # undefined and the script must say so in one line. Otherwise it prints the table and the plot.
    if out.returncode == 2:
        assert "eval/xnli/avg_accuracy is constant" in out.stderr and "Traceback" not in out.stderr
    else:
        assert out.returncode == 0, out.stderr[-3000:]
        assert "perplexity_written" in out.stdout and "spearman" in out.stdout
        assert (store / "corr" / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["stage=nope"], "unknown stage 'nope'"),
    (["stage=distill_final", "distill.logit.loss=nope"], "distill.logit.loss='nope'"),
    (["stage=distill_final", "teacher=nowhere"], "teacher='nowhere' is neither a stage"),
    (["stage=finetune", "finetune.locales=[xx-XX]"], "xx-XX"),
    (["stage=distill_final", "teacher=runs:/0123456789abcdef"], "no such MLflow run"),
    (["stage=distill_final", "augment.name=nope"], "augment.name='nope'"),
    (["stage=distill_final", "distill.intermediate.layer_mapping=nope"], "layer_mapping='nope'"),
    (["stage=distill_final", "distill.intermediate.loss=attention_mse"], "4 attention heads and the student 2"),
    (["stage=distill_final", "distill.logit.loss=logit_mse", "distill.cache.enabled=true"], "distill.cache.top_k"),
    (["stage=distill_intermediate", "distill.switch.criterion=sometimes"], "distill.switch.criterion"),
])
def test_bad_input_one_line_error(store, data_env, args, message):
    result = atm_train([*args, *TINY], store, data_env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_missing_role_without_training_is_an_error(tmp_path, data_env):
    result = atm_train(["stage=distill_final", "lineage.train_missing=false", *TINY], tmp_path, data_env)
    assert result.returncode == 2
    assert "lineage.train_missing=false" in result.stderr and "Traceback" not in result.stderr


def test_missing_data_directory(tmp_path, data_env):
    env = {**data_env, "ATM_DATA_MIRROR": str(tmp_path / "nowhere"), "ATM_DATA_DIR": str(tmp_path / "cache")}
    result = atm_train(["stage=train_tokenizer", *TINY], tmp_path, env)
    assert result.returncode == 2
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


def _metrics_of_newest(cwd: Path, stage: str) -> dict:
    runs = sorted(_runs(cwd, stage), key=lambda r: r.info.start_time)
    return runs[-1].data.metrics


def test_recipe_with_attention_augmentation_and_cache(store, data_env):
    recipe = ["stage=distill_final", "distill.intermediate.heads=mean", "distill.intermediate.layer_mapping=emd",
              "augment=contextual", "distill.cache.enabled=true", *TINY]
    first = atm_train([*recipe, "distill.intermediate.loss=attention_kl"], store, data_env)
    assert first.returncode == 0, first.stderr[-3000:]
    m = _metrics_of_newest(store, "distill_final")
    assert m["cache/teacher0/misses"] == 6 and "train/attention_kl" in m and "train/augment/rate" in m
    # another trial of the same sweep (other loss, same teacher, data and augmentation): all cache hits
    second = atm_train([*recipe, "distill.intermediate.loss=attention_mse"], store, data_env)
    assert second.returncode == 0, second.stderr[-3000:]
    m = _metrics_of_newest(store, "distill_final")
    assert m["cache/teacher0/hits"] == 6 and m["cache/teacher0/misses"] == 0 and m["cache/teacher0/size_mb"] > 0


def test_teacher_switch_on_plateau(store, data_env):
    result = atm_train(["stage=distill_intermediate", "distill.switch.criterion=plateau", "distill.switch.eval_every=1",
                        "distill.switch.patience=1", "distill.switch.min_delta=100", *TINY], store, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = sorted(_runs(store, "distill_intermediate"), key=lambda r: r.info.start_time)[-1]
    # step 1 sets the best held-out loss; step 2 does not improve it by min_delta=100: switch after step 2
    assert run.data.metrics["distill/switch_step"] == 3
    history = _client(store).get_metric_history(run.info.run_id, "distill/heldout_loss")
    assert [m.step for m in history] == [1, 2]


#: Sweep files run here, one trial each; the others run in the tests named.
SWEEPS_RUN_HERE = ["layer_mappings", "intermediate_objectives", "augmentation", "distiller_full", "bench_teacher_cache",
                   "student_cost"]
SWEEPS_RUN_ELSEWHERE = {
    "distill_losses": "test_sweep_three_trials_nested_and_study",
    "bench_pruning": "test_sweep_runs.py",
    "autodistiller_massive": "test_autodistiller.py", "autodistiller_xnli": "test_autodistiller.py",
    "alexatm_mini_ablation": "test_experiment.py",
}


def test_every_sweep_file_has_a_test_that_runs_it():
    files = {path.stem for path in (REPO / "sweeps").glob("*.yaml")}
    assert files == set(SWEEPS_RUN_HERE) | set(SWEEPS_RUN_ELSEWHERE)


@pytest.mark.parametrize("sweep", SWEEPS_RUN_HERE)
def test_every_sweep_config_runs(store, data_env, sweep):
    """Each sweep file composes, passes the sweeper's pre-flight checks and runs a trial on real data."""
    result = atm_train(["-m", f"+sweep={sweep}", "hydra.sweeper.n_trials=1", f"hydra.sweeper.study_name=t_{sweep}",
                        *TINY], store, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = [r for r in _runs(store) if r.data.tags.get("atm.sweep") == f"t_{sweep}" and r.data.tags.get("mlflow.parentRunId")]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    assert "eval/perplexity/spoken" in trials[0].data.metrics
