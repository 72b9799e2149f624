"""Sweeps through the real CLI on real data (``python -m atm.train -m +sweep=bench_pruning``, tiny Stage-1
pretraining trials): pruning, interrupt + resume, a multi-objective study with its report, bad sweep configs,
and three workers started together on fresh stores (SQLite files, PostgreSQL databases), with and without one
of them killed mid-trial."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY, atm_train, sigint_as_in_a_terminal, trained_store
from optuna.trial import TrialState

from analysis.bench_workers import stray_tables

PG = "postgresql+psycopg2://postgres@127.0.0.1:5432"
# Tiny trials: 6 steps, no intermediate checkpoints, few timed forward passes.
TRIAL = [o for o in TINY if not o.startswith(("trainer.save_every", "trainer.max_steps"))] + [
    "trainer.max_steps=6", "trainer.save_every=null", "cost.latency_runs=3", "cost.warmup_runs=1",
]
OBJECTIVE = "eval/perplexity/written"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _trial_runs(uri: str, study: str) -> list:
    """The MLflow runs of sweep ``study``: its parent run and its trials."""
    client = _client(uri)
    exp = client.get_experiment_by_name("atm")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`atm.sweep` = '{study}'",
                              max_results=1000)


def _by_trial(runs: list) -> dict[int, list]:
    """Trial number -> its MLflow runs (the parent run left out)."""
    out: dict[int, list] = {}
    for r in runs:
        if r.data.tags.get("optuna.trial_number") is not None:
            out.setdefault(int(r.data.tags["optuna.trial_number"]), []).append(r)
    return out


def _sweep_args(study: str, *extra: str) -> list[str]:
    return ["-m", "+sweep=bench_pruning", *TRIAL, f"hydra.sweeper.study_name={study}", *extra]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, data_env) -> Path:
    """A tiny trained tokenizer as a checkpoint directory (``tokenizer_run=<path>`` in the sweeps below)."""
    cwd = trained_store(tmp_path_factory, data_env, "sweep-tokenizer", ["stage=train_tokenizer", *TRIAL])
    import mlflow

    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    client = _client(uri)
    run = client.search_runs([client.get_experiment_by_name("atm").experiment_id])[0]
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="tokenizer",
                                                    dst_path=str(cwd / "download"), tracking_uri=uri))


def _popen(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "atm.train", *args], cwd=cwd, env=env, stdout=handle,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=sigint_as_in_a_terminal)


def _wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if procs and all(p.poll() is not None for p in procs):
            raise AssertionError(f"every worker exited before {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def test_pruning_marks_trials_pruned_in_optuna_and_mlflow(tmp_path, data_env, tokenizer_dir):
    """Median pruner on perplexity reported every 2 steps: some trials end early, PRUNED in Optuna, KILLED +
    ``atm.trial_state=PRUNED`` in MLflow with the metrics logged up to the step they stopped at."""
    result = atm_train(_sweep_args("prune", f"tokenizer_run={tokenizer_dir}", "hydra.sweeper.n_trials=5",
                                   "hydra.sweeper.pruner.report_every=2", "hydra.sweeper.pruner.n_startup_trials=1",
                                   "trainer.lr=tag(log, interval(1e-6, 3e-3))"), tmp_path, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="prune", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert pruned and complete and len(pruned) + len(complete) == 5
    by_trial = _by_trial(_trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "prune"))
    assert all(len(v) == 1 for v in by_trial.values())
    runs = {n: v[0] for n, v in by_trial.items()}
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for t in complete:
        run = runs[t.number]
        assert run.info.status == "FINISHED" and "atm.trial_state" not in run.data.tags
        assert sorted(t.intermediate_values) == [2, 4]  # the last step is the final evaluation, not a report
        assert run.data.metrics[OBJECTIVE] == pytest.approx(t.value)
        assert run.data.metrics["train/step"] == 6
    for t in pruned:
        run = runs[t.number]
        assert run.info.status == "KILLED" and run.data.tags["atm.trial_state"] == "PRUNED"
        assert t.user_attrs["mlflow_run_id"] == run.info.run_id
        stopped = max(t.intermediate_values)
        assert run.data.tags["atm.pruned_at_step"] == str(stopped) and stopped < 6
        # partial metrics kept: the reported perplexities, at the steps reported, and the training loss
        history = client.get_metric_history(run.info.run_id, OBJECTIVE)
        assert {m.step: m.value for m in history} == pytest.approx(t.intermediate_values)
        assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == stopped
        assert "train/step" not in run.data.metrics  # it never finished
        # the median pruner's rule: worse than the median of the earlier trials at that step
        earlier = [o.intermediate_values[stopped] for o in study.trials
                   if o.number < t.number and stopped in o.intermediate_values]
        assert t.intermediate_values[stopped] > sorted(earlier)[(len(earlier) - 1) // 2]


def test_interrupted_sweep_resumes_study_and_parent_run(tmp_path, data_env, tokenizer_dir):
    """Ctrl-C during trial #1, then the same command: the study and the MLflow parent run continue, trial #0
    is not redone, the interrupted trial is retried with the same params (its own new MLflow run)."""
    args = _sweep_args("resume", f"tokenizer_run={tokenizer_dir}", "hydra.sweeper.n_trials=3",
                       "hydra.sweeper.pruner.name=none")
    db = tmp_path / "optuna.db"
    proc = _popen(args, tmp_path, data_env, tmp_path / "first.log")
    try:
        def trial_one_running():
            if not db.exists():
                return False
            try:
                trials = optuna.load_study(study_name="resume", storage=f"sqlite:///{db}").trials
            except Exception:  # the study is being created
                return False
            return any(t.number == 1 and t.state == TrialState.RUNNING and t.user_attrs.get("mlflow_run_id")
                       for t in trials)

        _wait_for(trial_one_running, 600, "trial #1 to start", [proc])
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{db}")
    interrupted = study.trials[1]
    assert interrupted.state == TrialState.FAIL
    parents_before = {r.info.run_id for r in _trial_runs(uri, "resume") if r.data.tags.get("atm.sweep_parent")}

    result = atm_train(args, tmp_path, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 finished trial(s), running 2 more" in result.stdout + result.stderr
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{db}")
    assert _states(study) == {"COMPLETE": 3, "FAIL": 1}
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == interrupted.params
    runs = _trial_runs(uri, "resume")
    parents = [r for r in runs if r.data.tags.get("atm.sweep_parent")]
    assert [p.info.run_id for p in parents] == list(parents_before)  # the same parent, continued
    trials = [r for r in runs if not r.data.tags.get("atm.sweep_parent")]
    by_number: dict[int, list] = {}
    for r in trials:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        by_number.setdefault(int(r.data.tags["optuna.trial_number"]), []).append(r)
    assert sorted(by_number) == sorted(t.number for t in study.trials)  # every trial once, none redone
    assert all(len(v) == 1 for v in by_number.values())
    assert by_number[1][0].info.status == "FAILED"
    for t in study.trials:
        if t.state == TrialState.COMPLETE:
            assert by_number[t.number][0].info.status == "FINISHED"
            assert by_number[t.number][0].info.run_id == t.user_attrs["mlflow_run_id"]


def test_multi_objective_pareto_front_and_report(tmp_path, data_env, tokenizer_dir):
    """Perplexity versus measured CPU latency: the job returns both, the study has two directions, and the
    report (trials CSV, Pareto front table and PNG, plots) is written and logged on the parent run."""
    result = atm_train(_sweep_args("cost", f"tokenizer_run={tokenizer_dir}", "hydra.sweeper.n_trials=3",
                                   "hydra.sweeper.pruner.name=none", "hydra.sweeper.direction=[minimize,minimize]",
                                   f"hydra.sweeper.objectives=[{OBJECTIVE},cost/latency_ms]",
                                   "model.num_hidden_layers=choice(1,2)", "cost.latency_runs=5",
                                   f"hydra.sweep.dir={tmp_path / 'sweep'}"), tmp_path, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="cost", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {r.info.run_id: r for r in _trial_runs(uri, "cost")}
    for t in study.trials:
        metrics = runs[t.user_attrs["mlflow_run_id"]].data.metrics
        assert t.values == pytest.approx([metrics[OBJECTIVE], metrics["cost/latency_ms"]])
        assert metrics["cost/latency_ms"] > 0
        n_layers = t.params.get("model.num_hidden_layers")
        assert metrics["cost/parameters"] > metrics["cost/non_embedding_parameters"] > 0
        assert n_layers in (1, 2)

    import pandas as pd

    report = tmp_path / "sweep" / "report"
    front = pd.read_csv(report / "pareto_front.csv")
    assert sorted(front["number"]) == sorted(t.number for t in study.best_trials)
    trials = pd.read_csv(report / "trials.csv")
    assert sorted(trials["number"]) == [0, 1, 2]
    assert {OBJECTIVE, "cost/latency_ms", "mlflow_run_id", "worker", "params_model.num_hidden_layers"} <= set(
        trials.columns)
    assert dict(zip(trials["number"], trials["mlflow_run_id"])) == {
        t.number: t.user_attrs["mlflow_run_id"] for t in study.trials}
    for png in ("pareto_front.png", "optimization_history_0.png", "parallel_coordinate_1.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    summary = (report / "summary.md").read_text()
    assert "## Pareto front" in summary
    parent = [r for r in runs.values() if r.data.tags.get("atm.sweep_parent")]
    assert len(parent) == 1
    logged = {a.path for a in _client(uri).list_artifacts(parent[0].info.run_id, "report")}
    assert {"report/trials.csv", "report/pareto_front.csv", "report/pareto_front.png", "report/summary.md"} <= logged


BAD_SWEEPS = [
    ("trainer.no_such_key=choice(1,2)", "hydra.sweeper.params: overrides do not compose"),
    ("trainer.lr=choice()", "error: cannot parse override 'trainer.lr=choice()': ValueError while evaluating 'choice()': empty choice"),
    ("trainer.lr=interval(0.1,0.01)", "command-line override 'trainer.lr=interval(0.1,0.01)': low 0.1 > high 0.01"),
    ("hydra.sweeper.storage='postgresql+psycopg2://postgres@127.0.0.1:1/atm'",
     "hydra.sweeper.storage: cannot open postgresql+psycopg2://postgres@127.0.0.1:1/atm"),
    ("hydra.sweeper.pruner.name=hyperband", "hydra.sweeper.pruner.report_every"),
]


def test_bad_sweep_configs_fail_in_one_line_before_any_trial(tmp_path, data_env):
    for override, message in BAD_SWEEPS:
        cwd = tmp_path / str(BAD_SWEEPS.index((override, message)))
        cwd.mkdir()
        extra = ["hydra.sweeper.pruner.report_every=0"] if "pruner" in override else []
        result = atm_train(_sweep_args("bad", *extra, override), cwd, data_env, timeout=120)
        lines = [ln for ln in result.stderr.splitlines()
                 if ln.strip() and not ln.startswith("Set the environment variable HYDRA_FULL_ERROR")]
        assert result.returncode != 0 and len(lines) == 1 and message in lines[0], (override, result.stderr)
        assert not (cwd / "mlflow.db").exists() and not (cwd / "optuna.db").exists()


def _infra_error() -> Exception:
    """An AtmError wrapping a database error, as ``tracking.configure`` raises for a store being created."""
    import sqlalchemy.exc

    from atm.errors import AtmError

    try:
        try:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE tags", {}, Exception("database is locked"))
        except sqlalchemy.exc.OperationalError as err:
            raise AtmError("tracking store sqlite:///mlflow.db is not usable: database is locked") from err
    except AtmError as err:
        return err


def test_trial_failing_before_its_stage_on_infrastructure_is_retried(tmp_path):
    """A job that fails before its stage started (no MLflow run attached) with a database error is FAIL and
    retried with the same params (up to max_retry); a config AtmError, or a database error after the stage
    started, is a plain FAIL with no retry."""
    from hydra.core.utils import JobReturn, JobStatus

    from atm.errors import AtmError
    from hydra_plugins.atm_optuna_sweeper._sweeper import AtmOptunaSweeperImpl

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweeper = AtmOptunaSweeperImpl(sampler={"name": "random", "seed": 0}, heartbeat_interval=None, max_retry=1)
    study = optuna.create_study(study_name="infra", storage=url)

    def failed(err: BaseException) -> JobReturn:
        result = JobReturn()
        result.status, result._return_value = JobStatus.FAILED, err
        return result

    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert sweeper._retry_infrastructure_failure(study, trial, failed(_infra_error()))
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert study.trials[trial.number].state == TrialState.FAIL
    assert len(waiting) == 1 and waiting[0].params == study.trials[trial.number].params
    assert waiting[0].system_attrs["failed_trial"] == trial.number
    retry = study.ask()  # the WAITING retry, which fails the same way: max_retry=1 reached, no second retry
    assert retry.number == waiting[0].number
    assert not sweeper._retry_infrastructure_failure(study, retry, failed(_infra_error()))
    assert study.trials[retry.number].state == TrialState.FAIL and not study.get_trials(states=(TrialState.WAITING,))

    config_error = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    assert not sweeper._retry_infrastructure_failure(study, config_error, failed(AtmError("trainer.lr=-1: must be > 0")))
    started = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    started.set_user_attr("mlflow_run_id", "abc")  # atm.sweeps.attach ran: the stage started
    assert not sweeper._retry_infrastructure_failure(study, started, failed(_infra_error()))
    assert not study.get_trials(states=(TrialState.WAITING,))


# ----------------------------------------------------------------------------- several workers, PostgreSQL


def _postgres_or_skip() -> None:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(f"{PG}/test").connect():
            pass
    except Exception as err:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 not usable: {str(err).splitlines()[0]}")


@pytest.fixture
def pg_databases():
    """Two fresh PostgreSQL databases (Optuna storage, MLflow backend store), dropped afterwards."""
    _postgres_or_skip()
    import sqlalchemy

    names = [f"atm_sweep_{uuid.uuid4().hex[:10]}_{kind}" for kind in ("optuna", "mlflow")]
    admin = sqlalchemy.create_engine(f"{PG}/test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield [f"{PG}/{name}" for name in names]
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def _run_workers(tmp_path: Path, env: dict[str, str], args: list[str], optuna_url: str, study: str,
                 kill: bool, n_workers: int = 3) -> tuple[int | None, int | None, list, dict[int, str]]:
    """Start ``n_workers`` sweep workers of ``args`` together in ``tmp_path`` (a fresh store: they create it);
    with ``kill``, SIGKILL the worker of a RUNNING trial with an MLflow run, once a trial has completed.
    Returns (killed trial number, killed pid, the processes, pid -> log tail), after every worker exited."""
    workers = [_popen([*args, f"hydra.sweep.dir={tmp_path / f'w{i}'}"], tmp_path, env, tmp_path / f"w{i}.log")
               for i in range(n_workers)]
    pids = {p.pid: p for p in workers}
    killed_number = killed_pid = None
    try:
        if kill:
            storage = None  # one storage for the polling: a new one per poll holds a pooled connection until the
                            # garbage collector frees it, and ~100 of them exhaust PostgreSQL's max_connections

            def victim():
                nonlocal storage
                try:
                    storage = storage or optuna.storages.RDBStorage(optuna_url)
                    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
                except Exception:  # not created yet
                    return None
                if not any(t.state == TrialState.COMPLETE for t in trials):
                    return None  # the stores and the tokenizer are created by then
                for t in trials:
                    pid = int(t.user_attrs.get("worker", ":0").rsplit(":", 1)[1])
                    if t.state == TrialState.RUNNING and pid in pids and t.user_attrs.get("mlflow_run_id"):
                        return t.number, pid
                return None

            killed_number, killed_pid = _wait_for(victim, 600, "a running trial after a finished one", workers)
            pids[killed_pid].send_signal(signal.SIGKILL)
        for p in workers:
            p.wait(timeout=900)
    finally:
        for p in workers:
            p.kill()
    logs = {p.pid: (tmp_path / f"w{i}.log").read_text() for i, p in enumerate(workers)}
    return killed_number, killed_pid, workers, logs


def _check_sweep(optuna_url: str, mlflow_url: str, study_name: str, n_trials: int, killed_number: int | None,
                 killed_pid: int | None, workers: list, logs: dict[int, str], sweep_dirs: list[Path]) -> optuna.Study:
    """What several workers on a fresh store must leave: every live worker exited 0 without the false lock
    warning; exactly ``n_trials`` COMPLETE trials and FAIL only for the killed trial (retried once with its
    params); one MLflow parent run and exactly one MLflow run per trial under it; no migration tables left."""
    tails = {pid: text[-3000:] for pid, text in logs.items()}
    for p in workers:
        if p.pid == killed_pid:
            assert p.returncode == -signal.SIGKILL
        else:
            assert p.returncode == 0, tails[p.pid]
            assert "no cross-process lock" not in logs[p.pid], tails[p.pid]
    study = optuna.load_study(study_name=study_name, storage=optuna_url)
    # the killed trial is FAIL, unless the worker told it COMPLETE between the poll that saw it RUNNING and the kill
    killed_failed = killed_number is not None and study.trials[killed_number].state == TrialState.FAIL
    assert _states(study) == {"COMPLETE": n_trials, **({"FAIL": 1} if killed_failed else {})}, tails
    if killed_failed:
        failed = study.trials[killed_number]
        retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed_number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == failed.params

    runs = _trial_runs(mlflow_url, study_name)
    parents = [r for r in runs if r.data.tags.get("atm.sweep_parent")]
    assert len(parents) == 1
    trial_runs = _by_trial(runs)
    assert sorted(trial_runs) == sorted(t.number for t in study.trials)
    for t in study.trials:
        assert len(trial_runs[t.number]) == 1, t.number
        run = trial_runs[t.number][0]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        if t.state == TrialState.COMPLETE:
            assert run.info.status == "FINISHED" and run.data.metrics[OBJECTIVE] == pytest.approx(t.value)
        else:  # the killed worker's run, closed when its trial was retried
            assert run.info.status == "FAILED" and run.data.tags["atm.trial_state"] == "FAIL"
    assert stray_tables(mlflow_url) == [] and stray_tables(optuna_url) == []
    # the report of every worker that finished lists every trial
    for d in sweep_dirs:
        assert yaml.safe_load((d / "optimization_results.yaml").read_text())["n_trials"]["complete"] == n_trials
    return study


def _worker_args(study: str, n_trials: int, optuna_url: str, mlflow_url: str, *extra: str) -> list[str]:
    return ["-m", "+sweep=bench_pruning", *TRIAL, f"hydra.sweeper.study_name={study}",
            f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.storage='{optuna_url}'",
            "hydra.sweeper.pruner.name=none", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=4",
            f"tracking.uri='{mlflow_url}'", *extra]


@pytest.mark.parametrize("kill", [False, True], ids=["no_kill", "one_killed"])
def test_three_workers_on_a_fresh_sqlite_store(tmp_path, data_env, tokenizer_dir, kill):
    """The README's example: 3 workers started together on the default SQLite files (Optuna study and MLflow
    store), which none of them has created yet; with and without one worker SIGKILLed mid-trial. The stores are
    created once (under their locks), no trial fails but the killed one, every trial has one MLflow run."""
    optuna_url, mlflow_url = f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    n_trials = 6
    args = _worker_args("fresh", n_trials, optuna_url, mlflow_url, f"tokenizer_run={tokenizer_dir}")
    killed_number, killed_pid, workers, logs = _run_workers(tmp_path, data_env, args, optuna_url, "fresh", kill)
    dirs = [tmp_path / f"w{i}" for i, p in enumerate(workers) if p.pid != killed_pid]
    _check_sweep(optuna_url, mlflow_url, "fresh", n_trials, killed_number, killed_pid, workers, logs, dirs)


def test_three_workers_on_fresh_postgres(tmp_path, data_env, pg_databases, tokenizer_dir):
    """3 workers started together on two empty PostgreSQL databases (Optuna storage, MLflow backend store): the
    MLflow tables are created once (no ``UniqueViolation`` from concurrent ``CREATE TABLE``), every trial
    completes with one MLflow run."""
    optuna_url, mlflow_url = pg_databases
    n_trials = 6
    args = _worker_args("fresh", n_trials, optuna_url, mlflow_url, f"tokenizer_run={tokenizer_dir}")
    _, _, workers, logs = _run_workers(tmp_path, data_env, args, optuna_url, "fresh", False)
    _check_sweep(optuna_url, mlflow_url, "fresh", n_trials, None, None, workers, logs,
                 [tmp_path / f"w{i}" for i in range(3)])


def test_three_workers_on_postgres_one_killed(tmp_path, data_env, pg_databases):
    """3 worker processes share one study of 12 trials (Optuna storage and MLflow store on PostgreSQL, both empty:
    the workers create them); one is SIGKILLed mid-trial. Its trial is failed by heartbeat and retried with the
    same params by a live worker; the study ends with exactly 12 finished trials, each with exactly one FINISHED
    MLflow run; the missing tokenizer, needed by every worker at once, is trained once."""
    optuna_url, mlflow_url = pg_databases
    args = _worker_args("workers", 12, optuna_url, mlflow_url)
    killed_number, killed_pid, workers, logs = _run_workers(tmp_path, data_env, args, optuna_url, "workers", True)
    dirs = [tmp_path / f"w{i}" for i, p in enumerate(workers) if p.pid != killed_pid]
    study = _check_sweep(optuna_url, mlflow_url, "workers", 12, killed_number, killed_pid, workers, logs, dirs)
    assert len({tuple(sorted(t.params.items())) for t in study.trials if t.state == TrialState.COMPLETE}) >= 10
    client = _client(mlflow_url)
    tokenizers = client.search_runs([client.get_experiment_by_name("atm").experiment_id],
                                    filter_string="tags.`atm.stage` = 'train_tokenizer'")
    assert [r.info.status for r in tokenizers] == ["FINISHED"]
