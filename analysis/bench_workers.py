"""Benchmark: several sweep workers started together on fresh stores -- does every run end with n_trials COMPLETE?

    python analysis/bench_workers.py [--repeats 5] [--workers 3] [--trials 6] [--backends sqlite,postgresql]
                                     [--kill both|yes|no] [--sweep bench_pruning] [--pg URL] [--workdir DIR]

For each backend (SQLite files ``optuna.db`` + ``mlflow.db`` in a new directory; or two new PostgreSQL databases
on ``--pg``, dropped afterwards), each kill mode (no kill; one worker SIGKILLed while it runs a trial, once a trial
has completed) and each repeat, starts ``--workers`` copies of
``python -m atm.train -m +sweep=<sweep> hydra.sweeper.n_trials=<trials>`` at once on stores that none of them has
created (the README's "Several workers" example, with tiny training settings), waits for them, and prints one row:
the Optuna study's COMPLETE / FAIL / other trial counts, whether it has exactly ``n_trials`` COMPLETE and FAIL only
for the killed trial (none when the kill landed just after its worker recorded it COMPLETE), the MLflow runs per trial (``runs/trial``: min-max), trials whose MLflow run status is not the one their state
implies (``status≠``: COMPLETE -> FINISHED, FAIL -> FAILED), migration tables left behind
(``_alembic_tmp_*``), workers printing the false ``no cross-process lock`` warning, live workers that exited
non-zero, and the wall seconds. The last line says whether every run was exact. The tokenizer is trained once in
``<workdir>/tokenizer`` and passed to every worker as ``tokenizer_run=<dir>`` (``--train-tokenizer`` makes every
run train its own through lineage instead: slower, and it also races the train-once lock). Exit status 1 when a
run was not exact. A script, not a test (tests/test_sweep_runs.py has the asserting versions). Needs the data
(``ATM_DATA_MIRROR``) and, for ``postgresql``, a server accepting ``--pg`` (trust authentication).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from atm.errors import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
# Tiny trials (the tests' settings): 6 steps of a tiny Stage-1 teacher on a few lines, a small evaluation.
TINY = ["trainer.max_steps=6", "trainer.batch_size=8", "trainer.save_every=null", "trainer.log_every=2",
        "trainer.warmup_steps=1", "tokenizer.vocab_size=2000", "tokenizer.character_coverage=0.98",
        "tokenizer.max_lines_per_source=60", "data.written.max_lines_per_source=40",
        "data.spoken.max_lines_per_source=40", "data.heldout.max_lines_per_lang=4", "data.max_seq_len=32",
        "eval.perplexity.max_lines_per_lang=4", "cost.latency_runs=3", "cost.warmup_runs=1",
        "lineage.inherit=[lineage,data,tokenizer,tracking,trainer,eval,distill.switch]"]
FALSE_WARNING = "no cross-process lock"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "HYDRA_FULL_ERROR": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def train_tokenizer(workdir: Path) -> Path:
    """Train the tiny tokenizer once in ``workdir/tokenizer``; return its downloaded checkpoint directory."""
    import mlflow
    from mlflow.tracking import MlflowClient

    cwd = workdir / "tokenizer"
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "atm.train", "stage=train_tokenizer", *TINY], cwd=cwd, env=_env(),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"error: training the tokenizer failed:\n{proc.stderr[-2000:]}")
    uri = f"sqlite:///{cwd / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("atm").experiment_id])[0]
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="tokenizer",
                                                    dst_path=str(cwd / "download"), tracking_uri=uri))


def stray_tables(url: str) -> list[str]:
    """The tables of database ``url`` that an interrupted MLflow migration left behind (``_alembic_tmp_*``)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        return [t for t in sqlalchemy.inspect(engine).get_table_names() if t.startswith("_alembic_tmp")]
    finally:
        engine.dispose()


class _Databases:
    """Two new PostgreSQL databases (Optuna, MLflow) on server ``base``, dropped on exit."""

    def __init__(self, base: str) -> None:
        import sqlalchemy

        self.base = base.rstrip("/")
        self.names = [f"atm_bench_{uuid.uuid4().hex[:10]}_{kind}" for kind in ("optuna", "mlflow")]
        self.admin = sqlalchemy.create_engine(f"{self.base}/postgres", isolation_level="AUTOCOMMIT")

    def __enter__(self) -> list[str]:
        import sqlalchemy

        with self.admin.connect() as conn:
            for name in self.names:
                conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        return [f"{self.base}/{name}" for name in self.names]

    def __exit__(self, *exc) -> None:
        import sqlalchemy

        with self.admin.connect() as conn:
            for name in self.names:
                conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        self.admin.dispose()


def run_once(cwd: Path, optuna_url: str, mlflow_url: str, args: argparse.Namespace, kill: bool,
             tokenizer: Path | None) -> dict:
    """Start the workers together on the fresh stores, SIGKILL one mid-trial when ``kill``; return the row."""
    import optuna
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    study_name = "bench_workers"
    overrides = ["-m", f"+sweep={args.sweep}", *TINY, f"hydra.sweeper.study_name={study_name}",
                 f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.storage='{optuna_url}'",
                 "hydra.sweeper.pruner.name=none", "hydra.sweeper.heartbeat_interval=1",
                 "hydra.sweeper.grace_period=4", f"tracking.uri='{mlflow_url}'"]
    if tokenizer is not None:
        overrides.append(f"tokenizer_run={tokenizer}")
    start = time.perf_counter()
    logs = [cwd / f"w{i}.log" for i in range(args.workers)]
    procs = []
    for i, log in enumerate(logs):
        with open(log, "w") as handle:
            procs.append(subprocess.Popen([sys.executable, "-m", "atm.train", *overrides,
                                           f"hydra.sweep.dir={cwd / f'w{i}'}"], cwd=cwd, env=_env(),
                                          stdout=handle, stderr=subprocess.STDOUT))
    pids = {p.pid: p for p in procs}
    killed = killed_number = None
    storage = None
    try:
        while kill and killed is None and any(p.poll() is None for p in procs):
            time.sleep(0.3)
            try:
                storage = storage or optuna.storages.RDBStorage(optuna_url)
                trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
            except Exception:  # noqa: BLE001 -- not created yet
                continue
            if not any(t.state == TrialState.COMPLETE for t in trials):
                continue
            for t in trials:
                pid = int(t.user_attrs.get("worker", ":0").rsplit(":", 1)[1])
                if t.state == TrialState.RUNNING and pid in pids and t.user_attrs.get("mlflow_run_id"):
                    pids[pid].send_signal(signal.SIGKILL)
                    killed, killed_number = pid, t.number
                    break
        for p in procs:
            p.wait(timeout=args.timeout)
    finally:
        for p in procs:
            p.kill()
        if storage is not None:
            storage.engine.dispose()
    wall = time.perf_counter() - start

    counts = {"COMPLETE": 0, "FAIL": 0, "other": 0}
    per_trial: dict[int, int] = {}
    statuses: dict[int, set[str]] = {}
    try:
        trials = optuna.load_study(study_name=study_name, storage=optuna_url).trials
    except Exception:  # noqa: BLE001 -- the study was never created: every count stays 0
        trials = []
    for t in trials:
        counts[t.state.name if t.state.name in counts else "other"] += 1
    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("atm") if trials else None
    if experiment is not None:
        for r in client.search_runs([experiment.experiment_id], filter_string=f"tags.`atm.sweep` = '{study_name}'",
                                    max_results=1000):
            if r.data.tags.get("optuna.trial_number") is not None:
                number = int(r.data.tags["optuna.trial_number"])
                per_trial[number] = per_trial.get(number, 0) + 1
                statuses.setdefault(number, set()).add(r.info.status)
    runs = [per_trial.get(t.number, 0) for t in trials]
    texts = [log.read_text(errors="replace") for log in logs]
    # FAIL allowed only for the killed trial (which the worker may have told COMPLETE between poll and kill)
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    # a trial's MLflow run ends as Optuna recorded the trial: COMPLETE -> FINISHED, FAIL -> FAILED
    expected = {TrialState.COMPLETE: "FINISHED", TrialState.FAIL: "FAILED"}
    mismatched = sum(statuses.get(t.number, set()) != {expected.get(t.state, "?")} for t in trials)
    return {
        "complete": counts["COMPLETE"], "fail": counts["FAIL"], "other": counts["other"],
        "exact": (counts["COMPLETE"] == args.trials and failed in ([], [killed_number]) and not counts["other"]
                  and not mismatched),
        "mismatched": mismatched,
        "runs": f"{min(runs)}-{max(runs)}" if runs else "-",
        "stray": len(stray_tables(mlflow_url)) + len(stray_tables(optuna_url)),
        "warned": sum(FALSE_WARNING in text for text in texts),
        "bad_exit": sum(p.returncode != 0 for p in procs if p.pid != killed),
        "killed": killed is not None, "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per backend and kill mode")
    parser.add_argument("--workers", type=int, default=3, help="workers started together")
    parser.add_argument("--trials", type=int, default=6, help="n_trials of the study")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--kill", choices=("both", "yes", "no"), default="both", help="SIGKILL one worker mid-trial")
    parser.add_argument("--sweep", default="bench_pruning", help="the +sweep= to run (tiny settings are added)")
    parser.add_argument("--pg", default="postgresql+psycopg2://postgres@127.0.0.1:5432",
                        help="PostgreSQL server URL without a database (trust authentication)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go (default: a temp dir, removed)")
    parser.add_argument("--train-tokenizer", action="store_true", help="every run trains its tokenizer (lineage)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds to wait for a worker")
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(backends) - {"sqlite", "postgresql"}:
        parser.error(f"--backends: unknown {sorted(unknown)} (known: sqlite, postgresql)")
    kills = {"both": [False, True], "yes": [True], "no": [False]}[args.kill]
    if not os.environ.get("ATM_DATA_MIRROR") and not (REPO.parent / "shared" / "data").is_dir():
        parser.error("no data: set ATM_DATA_MIRROR")
    os.environ.setdefault("ATM_DATA_MIRROR", str(REPO.parent / "shared" / "data"))
    os.environ.setdefault("ATM_DATA_DIR", str(Path(tempfile.gettempdir()) / "atm-bench-workers-data"))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="atm-bench-workers-"))
    tokenizer = None if args.train_tokenizer else train_tokenizer(workdir)
    header = (f"{'backend':<10} {'kill':<4} {'rep':>3} {'COMPLETE':>8} {'FAIL':>4} {'other':>5} {'exact':>5} "
              f"{'runs/trial':>10} {'status≠':>7} {'stray':>5} {'warned':>6} {'bad_exit':>8} {'wall_s':>7}")
    print(f"{args.workers} workers, n_trials={args.trials}, +sweep={args.sweep}, {args.repeats} repeat(s)")
    print(header)
    rows = []
    try:
        for backend in backends:
            for kill in kills:
                for rep in range(args.repeats):
                    cwd = workdir / f"{backend}-{'kill' if kill else 'nokill'}-{rep}"
                    cwd.mkdir(parents=True)
                    if backend == "sqlite":
                        row = run_once(cwd, f"sqlite:///{cwd / 'optuna.db'}", f"sqlite:///{cwd / 'mlflow.db'}", args,
                                       kill, tokenizer)
                    else:
                        with _Databases(args.pg) as (optuna_url, mlflow_url):
                            row = run_once(cwd, optuna_url, mlflow_url, args, kill, tokenizer)
                    rows.append(row)
                    print(f"{backend:<10} {'yes' if row['killed'] else 'no':<4} {rep:>3} {row['complete']:>8} "
                          f"{row['fail']:>4} {row['other']:>5} {'yes' if row['exact'] else 'NO':>5} "
                          f"{row['runs']:>10} {row['mismatched']:>7} {row['stray']:>5} {row['warned']:>6} {row['bad_exit']:>8} "
                          f"{row['wall_s']:>7.0f}", flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    exact = sum(r["exact"] for r in rows)
    print(f"exactly n_trials={args.trials} COMPLETE (FAIL only for a killed trial) in {exact}/{len(rows)} runs: "
          f"{'yes' if exact == len(rows) else 'NO'}")
    return 0 if exact == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
