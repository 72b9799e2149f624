"""The team stack's tracking path without Docker: atm logs over HTTP to ``mlflow server`` (basic auth,
PostgreSQL backend store at 127.0.0.1:5432, proxied artifacts), started by the container's own entrypoint
``docker/mlflow/serve.py``; an unreachable or refusing server is a one-line error; ``docker-compose config``
accepts docker-compose.yml with .env.example. Also the stores themselves: a failed checkpoint upload ends the run
FAILED with nothing partial, and concurrent processes create a fresh SQLite store once.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY, atm_train

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
SERVE = REPO / "docker" / "mlflow" / "serve.py"
ADMIN = ("admin", f"pw-{uuid.uuid4().hex}")


def _pg(dbname: str = "test"):
    import psycopg2

    conn = psycopg2.connect(dbname=dbname, connect_timeout=3, **PG)
    conn.autocommit = True
    return conn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's own process group (mlflow server + its uvicorn workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``docker/mlflow/serve.py`` on a free loopback port with fresh PostgreSQL databases (tracking store
    and auth users); yields ``(uri, artifact dir, tracking db name)``; stops it and drops the databases."""
    pytest.importorskip("flask_wtf", reason="mlflow[auth] (Flask-WTF) is needed for --app-name basic-auth")
    import psycopg2

    try:
        _pg().close()
    except psycopg2.OperationalError as err:
        pytest.skip(f"no PostgreSQL at 127.0.0.1:5432 ({str(err).strip().splitlines()[0]})")
    db = f"atm_ts_{uuid.uuid4().hex[:10]}"
    conn = _pg()
    for name in (db, f"{db}_auth"):
        conn.cursor().execute(f"CREATE DATABASE {name}")
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_DB_HOST=PG["host"], MLFLOW_DB_PORT=str(PG["port"]), MLFLOW_DB_USER=PG["user"],
               MLFLOW_DB_PASSWORD="", MLFLOW_DB_NAME=db, MLFLOW_AUTH_DB_NAME=f"{db}_auth",
               MLFLOW_ARTIFACTS_DESTINATION=str(tmp / "artifacts"), MLFLOW_AUTH_ADMIN_USERNAME=ADMIN[0],
               MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1], MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(port),
               MLFLOW_WORKERS="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", TMPDIR=str(tmp))
    with open(tmp / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(SERVE)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield uri, tmp / "artifacts", db
    finally:
        _stop(proc)
        conn = _pg()
        for name in (db, f"{db}_auth"):
            conn.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _client_env(data_env: dict, user: str, password: str) -> dict:
    env = {k: v for k, v in data_env.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return env


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def logged(server, data_env, tmp_path_factory):
    """Stage 1 (which trains the tokenizer first), then Stage 2 (which reuses that Stage 1 run), logged
    through the server by two separate commands; yields the client and the runs by stage."""
    from mlflow.tracking import MlflowClient

    uri = server[0]
    env = _client_env(data_env, *ADMIN)
    cwd = tmp_path_factory.mktemp("tracking-client")
    for stage in ("pretrain_stage1", "pretrain_stage2"):
        result = atm_train([f"stage={stage}", *TINY, f"tracking.uri={uri}", "tracking.experiment=team"], cwd, env)
        assert result.returncode == 0, result.stderr[-3000:]
    assert not (cwd / "mlflow.db").exists()  # nothing went to the embedded default store
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("team")
        runs = client.search_runs([experiment.experiment_id])
        by_stage: dict[str, list] = {}
        for run in runs:
            by_stage.setdefault(run.data.tags["atm.stage"], []).append(run)
        yield client, by_stage


def test_runs_params_metrics_and_artifacts_are_on_the_server(server, logged):
    _, artifacts, db = server
    client, by_stage = logged
    assert {k: len(v) for k, v in by_stage.items()} == {"train_tokenizer": 1, "pretrain_stage1": 1,
                                                         "pretrain_stage2": 1}
    tok, s1 = by_stage["train_tokenizer"][0], by_stage["pretrain_stage1"][0]
    assert s1.info.status == "FINISHED" and tok.info.status == "FINISHED"
    assert s1.data.params["trainer.max_steps"] == "6" and s1.data.params["model.name"] == "teacher_tiny"
    assert s1.data.tags["atm.input.tokenizer_run"] == tok.info.run_id
    assert s1.data.metrics["train/step"] == 6.0 and s1.data.metrics["train/loss"] > 0
    assert [m.step for m in client.get_metric_history(s1.info.run_id, "train/loss")] == [2, 4, 6]
    model_id = s1.data.tags["atm.model_id"]  # the final checkpoint is the run's logged model
    names = {a.path for a in client.list_logged_model_artifacts(model_id)}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
    assert [a.path for a in client.list_artifacts(s1.info.run_id, "checkpoints")] == [
        "checkpoints/step-000002", "checkpoints/step-000004"]
    # the server proxied the files into its artifact destination, and the runs are rows in PostgreSQL
    (stored,) = [p for p in artifacts.rglob("model.safetensors") if model_id in p.parts]
    assert stored.stat().st_size > 100_000
    with _pg(db) as conn, conn.cursor() as cur:
        cur.execute("SELECT run_uuid FROM runs WHERE status = 'FINISHED'")
        assert {row[0] for row in cur.fetchall()} == {r.info.run_id for v in by_stage.values() for r in v}


def test_lineage_reuses_runs_through_the_server(logged):
    _, by_stage = logged
    tok, s1, s2 = (by_stage[s][0] for s in ("train_tokenizer", "pretrain_stage1", "pretrain_stage2"))
    # the second command found the finished Stage-1 run on the server and trained from its checkpoint
    assert s2.data.tags["atm.input.init"] == s1.info.run_id
    assert s2.data.tags["atm.consumed_run_ids"] == s1.info.run_id
    assert s2.info.status == "FINISHED" and s2.data.metrics["train/step"] == 6.0
    assert s1.data.tags["atm.consumed_run_ids"] == tok.info.run_id


def test_rejected_credentials_are_a_one_line_error(server, data_env, tmp_path):
    uri = server[0]
    result = atm_train(["stage=train_tokenizer", *TINY, f"tracking.uri={uri}"], tmp_path,
                       _client_env(data_env, ADMIN[0], "wrong-password"), timeout=120)
    line = _one_line_error(result)
    assert uri in line and "rejected" in line and "401" in line
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_is_a_one_line_error(data_env, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    result = atm_train(["stage=train_tokenizer", *TINY, f"tracking.uri={uri}"], tmp_path,
                       _client_env(data_env, *ADMIN), timeout=300)
    line = _one_line_error(result)
    assert uri in line and "not reachable" in line and "Connection refused" in line
    assert not (tmp_path / "mlflow.db").exists()  # no fallback to the embedded store


def test_probe_gives_up_at_once_and_restores_mlflow_settings(monkeypatch):
    from atm import tracking
    from atm.errors import AtmError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    uri = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(AtmError, match="not reachable"):
        tracking.probe_server(uri, "atm")
    # one attempt: with MLflow's retries (here 5, back-off factor 2) it would take a minute or more
    assert time.monotonic() - start < 20
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_failed_checkpoint_upload_ends_the_run_failed_with_nothing_partial(tmp_path, monkeypatch):
    """The artifact store fills up after the first file of a checkpoint: one AtmError line naming the checkpoint,
    the run ends FAILED (not RUNNING, not FINISHED), no partial ``checkpoint/`` is left in the artifact store, and
    lineage finds no finished run to reuse."""
    import errno

    import mlflow
    from conftest import mlflow_store
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from omegaconf import OmegaConf

    from atm import tracking
    from atm.errors import AtmError

    uri, client, experiment_id = mlflow_store(tmp_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    checkpoint = tmp_path / "out"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 4096)

    def full_disk(self, local_dir, artifact_path=None):  # copies one file, then the disk is full
        target = Path(self._get_or_create_artifact_dir(artifact_path))
        shutil.copy(Path(local_dir) / "config.json", target / "config.json")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalArtifactRepository, "log_artifacts", full_disk)
    cfg = OmegaConf.create({"stage": {"name": "pretrain_stage1"}, "run_name": "upload-test"})
    with pytest.raises(AtmError) as info, tracking.start_run(cfg, "hash-upload", {}) as run:
        run_id = run.info.run_id
        tracking.log_checkpoint(checkpoint)
    message = str(info.value)
    assert "\n" not in message and "checkpoint" in message and run_id in message and "No space left" in message
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.list_artifacts(run_id, tracking.CHECKPOINT) == []
    (model,) = client.search_logged_models([experiment_id])  # the final checkpoint's logged model: FAILED, empty
    assert model.status.name == "FAILED" and model.source_run_id == run_id
    assert [p.name for p in (tmp_path / "artifacts").rglob("*") if p.is_file()] == ["config.yaml"]  # the run's
    assert not (tmp_path / "artifacts" / run_id / "artifacts" / tracking.CHECKPOINT).exists()
    assert tracking.find_finished_run(experiment_id, "pretrain_stage1", "hash-upload") is None


def test_concurrent_configure_creates_a_fresh_sqlite_store_once(tmp_path):
    """8 processes configure the same fresh SQLite MLflow store at once: all get the same experiment id, the
    store has one ``atm`` experiment and no migration tables left (``_alembic_tmp_*``)."""
    import sqlalchemy

    code = ("import sys; from omegaconf import OmegaConf; from atm import tracking; "
            "print(tracking.configure(OmegaConf.create({'tracking': {'uri': sys.argv[1], 'experiment': 'atm'}})))")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1
    engine = sqlalchemy.create_engine(uri)
    try:
        assert not [t for t in sqlalchemy.inspect(engine).get_table_names() if t.startswith("_alembic_tmp")]
        with engine.connect() as conn:
            names = [r[0] for r in conn.execute(sqlalchemy.text("SELECT name FROM experiments"))]
    finally:
        engine.dispose()
    assert sorted(names) == ["Default", "atm"]


def _compose() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 check=False).returncode == 0:
        return ["docker", "compose"]
    return None


def _compose_config(env_file: Path) -> subprocess.CompletedProcess:
    compose = _compose()
    if compose is None:
        pytest.skip("neither docker-compose nor `docker compose` is installed (apt-get install docker-compose)")
    env = {"PATH": os.environ["PATH"], "HOME": str(env_file.parent)}  # only the env file supplies values
    return subprocess.run([*compose, "--env-file", str(env_file), "-f", str(REPO / "docker-compose.yml"),
                           "config"], capture_output=True, text=True, env=env, cwd=env_file.parent, timeout=120,
                          check=False)


def _env_file(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_compose_config_accepts_the_stack_with_the_example_env(tmp_path):
    example = _env_file((REPO / ".env.example").read_text())
    result = _compose_config(REPO / ".env.example")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"postgres", "mlflow"}
    mlflow, postgres = services["mlflow"]["environment"], services["postgres"]["environment"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in services["mlflow"] and "healthcheck" in services["postgres"]
    # every credential is interpolated from the env file
    assert mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"] == example["MLFLOW_ADMIN_PASSWORD"]
    assert mlflow["MLFLOW_DB_PASSWORD"] == postgres["MLFLOW_DB_PASSWORD"] == example["MLFLOW_DB_PASSWORD"]
    assert postgres["POSTGRES_PASSWORD"] == example["POSTGRES_PASSWORD"]
    assert postgres["OPTUNA_DB_PASSWORD"] == example["OPTUNA_DB_PASSWORD"]
    compose_text = (REPO / "docker-compose.yml").read_text()
    assert not [v for k, v in example.items() if "PASSWORD" in k and v in compose_text]

    # a missing secret stops `config` with the variable's name
    broken = tmp_path / "broken.env"
    broken.write_text("\n".join(f"{k}={v}" for k, v in example.items() if k != "MLFLOW_ADMIN_PASSWORD"))
    result = _compose_config(broken)
    assert result.returncode != 0 and "MLFLOW_ADMIN_PASSWORD" in result.stderr
