"""Tests of the `alexatm_mini` experiment (conf/experiment/): what its jobs run, that lineage hands each job the
runs it means (teacher sizes, students, the fine-tuning baseline), and a real tiny multirun of two of its jobs."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, atm_train, finished_runs_by_stage, tiny_experiment
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from atm import tracking
from atm.lineage import compose_stage
from atm.models.encoder import count_parameters, load_preset
from atm.stages import finetune as F
from atm.stages import get_stage
from atm.tasks.massive import SCORES

CONF = REPO / "conf"
JOBS_KEY = "experiment/alexatm_mini_jobs@_global_"
ABLATION_JOB = "ablation"  # the trial of sweeps/alexatm_mini_ablation.yaml, not a job of the multirun


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    """One Hydra context for the module: every compose (and atm.lineage.compose_stage) reuses it."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        yield


def _compose(overrides: list[str]):
    return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def _jobs(experiment: str = "alexatm_mini") -> list[str]:
    params = _compose([f"+experiment={experiment}"]).hydra.sweeper.params
    return [job.strip() for job in params[JOBS_KEY].split(",")]


@functools.cache
def _job(job: str, experiment: str = "alexatm_mini"):
    cfg = _compose([f"+experiment={experiment}", f"{JOBS_KEY}={job}"])
    OmegaConf.resolve(cfg)
    return cfg


def _input_config(cfg, stage: str):
    """The config lineage composes for an input of ``stage`` of the job ``cfg`` (experiment inherited)."""
    return compose_stage(stage, ["+experiment=alexatm_mini", *cfg.lineage.overrides.get(stage, [])])


def test_jobs_cover_the_paper():
    jobs = _jobs()
    files = sorted(p.stem for p in (CONF / "experiment" / "alexatm_mini_jobs").glob("*.yaml"))
    assert sorted([*jobs, ABLATION_JOB]) == files  # every job file runs, once (the ablation's in its sweep)
    evaluated, finetuned = set(), []
    for job in jobs:
        cfg = _job(job)
        if cfg.stage.name == "evaluate":
            target = cfg.target
            model = _input_config(cfg, "pretrain_stage1").model.name if target.startswith("pretrain") else None
            evaluated.add((target, model))
        else:
            assert cfg.stage.name == "finetune"
            F.check(cfg)
            finetuned.append(cfg)
    teachers = {"teacher_tiny_s", "teacher_tiny_m", "teacher_tiny"}
    assert {(f"pretrain_stage{s}", t) for s in (1, 2) for t in teachers} <= evaluated
    assert {("distill_intermediate", None), ("distill_final", None)} <= evaluated
    sizes = [count_parameters(load_preset(t), vocab_size=8000, non_embedding=True) for t in sorted(teachers)]
    assert len(set(sizes)) == 3
    full = [c for c in finetuned if c.finetune.setting == "full"]
    assert all(list(c.finetune.locales) == ["en-US"] == list(c.finetune.eval_locales) for c in full)
    assert {c.encoder for c in full} >= {"pretrain_stage1", "pretrain_stage2", "distill_intermediate",
                                         "distill_final"}
    assert {c.encoder for c in full if c.finetune.freeze_encoder} == {"pretrain_stage1", "pretrain_stage2"}
    zero = [c for c in finetuned if c.finetune.setting == "zero_shot"]
    assert zero and all(list(c.finetune.locales) == ["en-US"] and len(c.finetune.eval_locales) >= 5 for c in zero)
    # zero-shot too: each student, its teacher and the same-size Stage-2 model (distillation_table's baselines)
    assert {(c.encoder, c.alexatm.teacher if c.encoder == "pretrain_stage2" else None) for c in zero} == {
        *(("pretrain_stage2", t) for t in teachers), ("distill_intermediate", None), ("distill_final", None)}


def test_the_findings_rest_on_powered_jobs():
    """Every fine-tuning a finding of analysis/findings.py compares trains on the whole en-US train split with
    early stopping, tests on all 2,974 test utterances and has >= 3 seeds; its Stage-1 evaluations score >= 3
    checkpoints per teacher with the XNLI probe on all test pairs."""
    from analysis._findings_spec import SPECS

    jobs = set(_jobs())
    named = {job for spec in SPECS.values() for job in spec.jobs if job != ABLATION_JOB}
    assert named <= jobs
    for job in sorted(named):
        cfg = _job(job)
        if cfg.stage.name == "finetune":
            ft = cfg.finetune
            assert (ft.setting, ft.freeze_encoder, ft.max_train_per_locale, ft.max_eval_per_locale) == (
                "full", False, None, None), job
            assert len(set(ft.seeds)) >= 3 and ft.early_stopping.eval_every, job
        else:
            assert cfg.stage.name == "evaluate" and cfg.eval.checkpoints == "all", job
            assert cfg.eval.xnli.max_test_pairs_per_lang is None and "en" in cfg.eval.xnli.languages, job
            stage1 = _input_config(cfg, "pretrain_stage1")
            assert stage1.trainer.max_steps // stage1.trainer.save_every >= 3, job


def test_lineage_trains_the_sizes_and_checkpoints_each_job_names():
    small = _job("eval_stage2_s")
    stage2 = _input_config(small, "pretrain_stage2")
    assert stage2.alexatm.teacher == "teacher_tiny_s"  # handed on, so that Stage 2 continues the small teacher
    stage1 = _input_config(stage2, "pretrain_stage1")
    assert stage1.model.name == "teacher_tiny_s"
    assert stage1.trainer.max_steps // stage1.trainer.save_every >= 2  # several scored checkpoints
    assert stage2.trainer.max_steps // stage2.trainer.save_every >= 2
    final = _job("ft_final")
    student = _input_config(final, "distill_final")
    intermediate = _input_config(student, "distill_intermediate")
    assert (student.model.name, intermediate.model.name) == ("student_tiny", "intermediate_tiny")
    teacher = _input_config(intermediate, "pretrain_stage1")
    assert teacher.model.name == "teacher_tiny" and intermediate.teacher_next == "pretrain_stage2"


def test_the_final_student_trains_the_step_budget_of_its_same_size_baseline():
    """Finding F3 (student vs same-size model without distillation) compares equal budgets: the final student
    takes as many optimiser steps of the same batch as teacher S takes in Stage 1 and Stage 2 together."""
    student = _input_config(_job("ft_final"), "distill_final")
    stage2 = _input_config(_job("ft_stage2_s"), "pretrain_stage2")
    stage1 = _input_config(stage2, "pretrain_stage1")
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    assert [student.model[k] for k in shape] == [stage1.model[k] for k in shape]
    assert student.trainer.max_steps == stage1.trainer.max_steps + stage2.trainer.max_steps
    assert student.trainer.batch_size == stage1.trainer.batch_size == stage2.trainer.batch_size
    assert student.data.max_seq_len == stage1.data.max_seq_len


def test_the_final_students_baseline_is_the_teacher_finetune_job():
    final, teacher = _job("ft_final"), _job("ft_stage2_l")
    assert final.baseline == "finetune"
    baseline = _input_config(final, "finetune")  # what lineage resolves baseline=finetune to
    keys = get_stage("finetune").hashed_keys(baseline)
    assert tracking.config_hash(baseline, keys) == tracking.config_hash(teacher, keys)
    assert baseline.encoder == teacher.encoder == "pretrain_stage2"
    assert list(baseline.lineage.overrides.pretrain_stage2) == list(teacher.lineage.overrides.pretrain_stage2)


def test_the_ablation_sweep_distils_the_experiments_intermediate_student_from_its_teachers():
    sweeper = _compose(["+experiment=alexatm_mini", "+sweep=alexatm_mini_ablation"]).hydra.sweeper
    assert sweeper.params[JOBS_KEY] == ABLATION_JOB  # replaces the experiment's job list: every trial is one
    assert sweeper.sampler.name == "grid" and sweeper.n_trials == 9
    trial, student = _job(ABLATION_JOB), _input_config(_job("ft_intermediate"), "distill_intermediate")
    assert trial.stage.name == student.stage.name == "distill_intermediate"
    assert (trial.model.name, trial.trainer.max_steps, trial.distill.switch.steps) == (
        student.model.name, student.trainer.max_steps, student.distill.switch.steps)
    for stage in ("pretrain_stage1", "pretrain_stage2"):  # the same teacher runs, found by config hash
        ours, theirs = _input_config(trial, stage), _input_config(student, stage)
        keys = get_stage(stage).hashed_keys(ours)
        assert ours.model.name == "teacher_tiny"
        assert tracking.config_hash(ours, keys) == tracking.config_hash(theirs, keys)


def test_gpu_configuration_composes_with_larger_models():
    assert _jobs("alexatm_gpu") == _jobs()
    cfg = _job("ft_final", "alexatm_gpu")
    assert cfg.trainer.precision == "bf16" and cfg.finetune.max_train_per_locale is None
    sizes = [count_parameters(load_preset(cfg.alexatm.teachers[s]), vocab_size=32000, non_embedding=True)
             for s in "sml"]
    assert sizes == sorted(sizes) and sizes[-1] > 1e9
    student = _input_config(cfg, "distill_final")
    assert student.model.name == "student_17m"


# ------------------------------------------------------------------------------------ a real multirun

TINY_EXPERIMENT = tiny_experiment("alexatm_mini")


@pytest.mark.slow
def test_tiny_multirun_of_two_jobs_then_the_ablation_sweep(tmp_path: Path, data_env):
    result = atm_train([*TINY_EXPERIMENT, f"{JOBS_KEY}=ft_stage2_l,ft_final", "-m"], tmp_path, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = finished_runs_by_stage(tmp_path)
    # lineage trained each input once: tokenizer, Stage 1 + 2 of the largest teacher, the two students
    assert {k: len(v) for k, v in runs.items()} == {"train_tokenizer": 1, "pretrain_stage1": 1, "pretrain_stage2": 1,
                                                    "distill_intermediate": 1, "distill_final": 1, "finetune": 2}
    assert runs["pretrain_stage1"][0].data.params["model.name"] == "teacher_tiny"
    assert runs["pretrain_stage1"][0].data.metrics["cost/non_embedding_parameters"] > 0
    teacher_ft, student_ft = runs["finetune"]
    assert student_ft.data.tags["atm.baseline_run_id"] == teacher_ft.info.run_id
    assert student_ft.data.tags["atm.input.encoder"] == runs["distill_final"][0].info.run_id
    for locale in ["en-US", "avg"]:  # the experiment's full setting: en-US
        for score in SCORES:
            key = f"compare/massive/{locale}/{score}_rel_error_change"
            s, b = student_ft.data.metrics[f"eval/massive/{locale}/{score}"], teacher_ft.data.metrics[
                f"eval/massive/{locale}/{score}"]
            if b < 1:
                assert student_ft.data.metrics[key] == pytest.approx(((1 - s) - (1 - b)) / (1 - b))
    # the ablation sweep, after the experiment: its trials reuse the experiment's teachers
    result = atm_train([*TINY_EXPERIMENT, "+sweep=alexatm_mini_ablation", "hydra.sweeper.n_trials=2", "-m"], tmp_path,
                       data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = [t for t in client.search_runs(["1"], "tags.`atm.sweep` = 'alexatm_mini_ablation'")
              if tracking.TAG_SWEEP_PARENT not in t.data.tags]
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert {t.data.tags["atm.stage"] for t in trials} == {"distill_intermediate"}
    stage1, stage2 = runs["pretrain_stage1"][0].info.run_id, runs["pretrain_stage2"][0].info.run_id
    assert {(t.data.tags["atm.input.teacher"], t.data.tags["atm.input.teacher_next"]) for t in trials} == {
        (stage1, stage2)}
    assert len(client.search_runs(["1"], "tags.`atm.stage` = 'pretrain_stage1'")) == 1
    assert {t.data.params["distill.logit.loss"] for t in trials} <= {"soft_ce", "kl", "logit_mse"}
    # the sweep report names the objective the trials' stage has (the job, not the sweep's config, sets the stage)
    (parent,) = client.search_runs(["1"], "tags.`atm.sweep_parent` = 'alexatm_mini_ablation'")
    header = Path(client.download_artifacts(parent.info.run_id, "report/trials.csv", str(tmp_path))).read_text()
    assert "eval/perplexity/spoken" in header.splitlines()[0].split(",")
    report = subprocess.run([sys.executable, str(REPO / "analysis" / "ablation_report.py"), "--tracking-uri",
                             f"sqlite:///{tmp_path}/mlflow.db", "--sweep", "alexatm_mini_ablation", "--out",
                             str(tmp_path / "ablation"), "--no-log"], cwd=tmp_path, env=data_env, check=False,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert "| distill." in report.stdout and (tmp_path / "ablation" / "marginal_means.png").is_file()
