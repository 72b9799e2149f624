"""analysis/_store.py reads the tags atm writes: runs logged by atm.tracking's own functions (as ``atm.train``
logs a sweep trial: :func:`atm.tracking.sweep_parent`, then :func:`atm.tracking.start_run` with ``atm.sweep`` and
the trial number) are found by the analysis run query, with their lineage and trial number."""

from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow")
from conftest import mlflow_store

from analysis import ablation_report, bench_teacher_cache
from analysis._store import RunIndex, is_sweep_trial, local_store_uri
from atm import tracking
from atm.lineage import compose_stage

STUDY = "store_study"
TRIAL_NUMBER = 3


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A Stage-1 teacher and one trial (number 3) of sweep ``store_study`` distilling it, logged by atm.tracking
    into ``<root>/mlflow.db``, where ``python -m atm.train`` run in ``<root>`` would have put them."""
    root = tmp_path_factory.mktemp("analysis-store")
    uri, client, exp_id = mlflow_store(root)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment("atm")
        with tracking.start_run(compose_stage("pretrain_stage1", ["model=teacher_tiny"]), "0" * 16, {}) as run:
            teacher = run.info.run_id
        parent = tracking.sweep_parent(exp_id, STUDY, None)
        tags = {tracking.TAG_SWEEP: STUDY, tracking.TAG_TRIAL: str(TRIAL_NUMBER)}  # what atm.train.execute sets
        cfg = compose_stage("distill_final", [])
        with tracking.start_run(cfg, "1" * 16, {"teacher": teacher}, parent, tags) as run:
            trial = run.info.run_id
            mlflow.log_metric("eval/perplexity/spoken", 12.5)
    finally:
        mlflow.set_tracking_uri(previous)
    return {"root": root, "uri": uri, "teacher": teacher, "parent": parent, "trial": trial}


def test_the_analysis_query_finds_what_atm_logged(logged):
    index = RunIndex.at(logged["uri"])
    assert local_store_uri(logged["root"]) == logged["uri"]
    teacher, trial = index.get(logged["teacher"]), index.get(logged["trial"])
    assert index.of_stage("pretrain_stage1") == [teacher]
    assert index.of_stage("distill_final") == [trial]
    assert is_sweep_trial(trial) and not is_sweep_trial(teacher) and not is_sweep_trial(index.get(logged["parent"]))
    assert index.input(trial, "teacher") is teacher
    assert index.consumers(logged["teacher"], "teacher") == [trial]


def test_the_trial_number_is_read_from_the_tag_atm_writes(logged):
    """The analysis reads the trial number under atm's name for it (``optuna.trial_number``, not a name atm
    never writes)."""
    index = RunIndex.at(logged["uri"])
    trial = index.get(logged["trial"])
    assert ablation_report.TAG_TRIAL in trial.data.tags
    frame, counts = ablation_report.trial_frame(index, index.get(logged["parent"]))
    assert list(frame["trial"]) == [TRIAL_NUMBER] and counts["counted"] == 1
    assert list(frame["run_id"]) == [logged["trial"]]
    assert bench_teacher_cache._teacher_run(logged["root"]) == logged["teacher"]
    [(number, seconds, cache_mb)] = bench_teacher_cache._trial_seconds(logged["root"], STUDY)
    assert number == TRIAL_NUMBER and seconds >= 0 and cache_mb == 0.0
