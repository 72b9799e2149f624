"""The MLflow UI as the researcher's home (issue 15): what a tiny sweep leaves in a fresh store, read back through
``mlflow server``'s REST API as the UI reads it: the experiment's kind (the UI opens on training runs), the trials
nested under the sweep's parent run, the datasets each run read, each run's description linking its inputs' runs,
the parent's description naming the best trial and showing the report's plots; MLflow system metrics; the best
trial's model registered (``tracking.register_best``, ``python -m atm.sweeps.register``); and the screenshot script
``tools/screenshots.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY, atm_train

from atm.tracking import EXPERIMENT_KIND, TAG_EXPERIMENT_KIND, TAG_NOTE

N_TRIALS = 2
REGISTERED = "tiny teacher"  # tracking.register_best (a space: names are not URL paths)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, data_env):
    """A fresh working directory where a 2-trial sweep ran (lineage trained the tokenizer first), registering its
    best trial's model as ``REGISTERED``."""
    cwd = tmp_path_factory.mktemp("ui-sweep")
    result = atm_train(["-m", "+sweep=bench_pruning", *TINY, f"hydra.sweeper.n_trials={N_TRIALS}",
                        "hydra.sweeper.pruner.name=none", f"hydra.sweeper.storage=sqlite:///{cwd}/optuna.db",
                        f"hydra.sweep.dir={cwd}/sweep", f"tracking.register_best={REGISTERED}"], cwd, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rest(sweep_dir):
    """``mlflow server`` on loopback over the sweep's store; yields a function ``(method, path, body) -> json``."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{sweep_dir}/mlflow.db", "--workers", "1"],
                              cwd=sweep_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow/"

    def call(method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    call.uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                call("GET", "experiments/search?max_results=1")
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not answer"
                time.sleep(0.5)
        yield call
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in entity.get("tags", [])}


def test_the_experiment_opens_on_training_runs(rest):
    experiment = rest("GET", "experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": "atm"}))
    assert _tags(experiment["experiment"])[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND


def test_trials_nest_under_the_sweep_and_link_their_inputs(rest):
    experiment = rest("GET", "experiments/get-by-name?experiment_name=atm")["experiment"]
    runs = rest("POST", "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    by_id = {r["info"]["run_id"]: r for r in runs}
    tags = {rid: _tags(r["data"]) for rid, r in by_id.items()}
    (parent,) = [rid for rid, t in tags.items() if t.get("atm.sweep_parent") == "bench_pruning"]
    trials = [rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == parent]
    assert len(trials) == N_TRIALS
    (tokenizer,) = [rid for rid, t in tags.items() if t.get("atm.stage") == "train_tokenizer"]
    link = f"(#/experiments/{experiment['experiment_id']}/runs/{tokenizer})"
    for rid in trials:
        note = tags[rid][TAG_NOTE]
        assert note.startswith("**pretrain_stage1**") and f"- tokenizer_run: [{tokenizer}]{link}" in note, note
    assert "Inputs: none" in tags[tokenizer][TAG_NOTE]
    # the Dataset column: what each run read, by name and context
    for rid, expected in [(tokenizer, {("written/ud", "training"), ("spoken/massive", "training")}),
                          *[(t, {("written/ud", "training"), ("written/ud_dev", "evaluation")}) for t in trials]]:
        inputs = by_id[rid].get("inputs", {}).get("dataset_inputs", [])
        read = {(i["dataset"]["name"], _tags(i)["mlflow.data.context"]) for i in inputs}
        assert expected <= read, (rid, read)
        assert all(i["dataset"]["digest"] and '"num_rows"' in i["dataset"]["profile"] for i in inputs)
    # the parent names the best trial (a link to its run) and shows the sweep report's plots
    best = tags[parent]["sweep.best_run_id"]
    assert best in trials
    note = tags[parent][TAG_NOTE]
    assert f"[#{tags[parent]['sweep.best_trial']}](#/experiments/{experiment['experiment_id']}/runs/{best})" in note
    plots = [f["path"] for f in rest("GET", f"artifacts/list?run_id={parent}&path=report").get("files", [])
             if f["path"].endswith(".png")]
    assert plots and all(f"![{p}](get-artifact?path={p}&run_uuid={parent})" in note for p in plots), (plots, note)


def test_final_checkpoints_are_logged_models_that_transformers_loads(rest, tmp_path):
    """Every trained run's final checkpoint is a READY logged model named after its stage, linked to the run as its
    output (the UI's Models column), named by the run's ``atm.model_id`` tag; ``transformers`` loads its
    artifact directory as downloaded, and the run holds no second copy under ``checkpoint/``."""
    import mlflow
    import transformers
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    from atm.tracking import CHECKPOINT, TAG_MODEL

    client = MlflowClient(rest.uri)
    experiment = client.get_experiment_by_name("atm")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("atm.stage") ==
            "pretrain_stage1"]
    assert len(runs) == N_TRIALS
    models = {m.model_id: m for m in client.search_logged_models([experiment.experiment_id])}
    for run in runs:
        model = models[run.data.tags[TAG_MODEL]]
        assert model.name == "pretrain_stage1" and model.status == LoggedModelStatus.READY
        assert model.source_run_id == run.info.run_id
        assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
        assert client.list_artifacts(run.info.run_id, CHECKPOINT) == []
        local = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, tracking_uri=rest.uri,
                                                    dst_path=str(tmp_path / model.model_id))
        loaded = transformers.AutoModelForMaskedLM.from_pretrained(local)
        assert loaded.num_parameters() > 0 and (Path(local) / "tokenizer.json").exists()


def test_system_metrics_are_logged_as_configured(tmp_path, data_env, rest):
    """Sampling every 0.2 s and logging every 0.4 s, a few-second run has ``system/`` metrics; with the default
    settings (a value a minute) the sweep's runs shorter than a minute have none, those of a minute or more (a
    loaded machine) at most one value per full minute."""
    from mlflow.tracking import MlflowClient

    result = atm_train(["stage=train_tokenizer", *TINY, "tracking.system_metrics_interval=0.2",
                        "tracking.system_metrics_log_every=0.4"], tmp_path, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("atm").experiment_id])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    experiment = rest("GET", "experiments/get-by-name?experiment_name=atm")["experiment"]
    runs = rest("POST", "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    assert runs
    for r in runs:
        minutes = (int(r["info"]["end_time"]) - int(r["info"]["start_time"])) // 60_000
        keys = [m["key"] for m in r["data"].get("metrics", []) if m["key"].startswith("system/cpu_utilization")]
        assert len(keys) <= minutes, (r["info"]["run_name"], minutes, keys)
        if keys:
            history = rest("GET", f"metrics/get-history?run_id={r['info']['run_id']}&metric_key={keys[0]}")
            assert len(history["metrics"]) <= minutes


def _register_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atm.sweeps.register", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_best_trial_is_registered_with_its_metrics_and_lineage(rest, sweep_dir, data_env, tmp_path,
                                                                     monkeypatch):
    """``tracking.register_best``: version 1 of the registered model holds the best trial's logged model (source
    ``models:/<id>``, run = the best trial), its tags carry the objective, the run's final metrics and its lineage,
    the sweep parent links it; ``transformers`` loads ``models:/<name>/1`` as downloaded; registering the same
    sweep again (``python -m atm.sweeps.register --study``) adds no version, another trial's model adds version 2."""
    import mlflow
    import transformers
    from mlflow.tracking import MlflowClient

    from atm.sweeps import register
    from atm.tracking import TAG_MODEL

    client = MlflowClient(rest.uri)
    experiment = client.get_experiment_by_name("atm")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("atm.sweep_parent") == "bench_pruning"]
    best = client.get_run(parent.data.tags["sweep.best_run_id"])
    (tokenizer,) = [r for r in runs if r.data.tags.get("atm.stage") == "train_tokenizer"]
    model = client.get_registered_model(REGISTERED)
    assert "atm" in model.description
    (version,) = client.search_model_versions(f"name = '{REGISTERED}'")
    model_id = best.data.tags[TAG_MODEL]
    assert version.version == "1" and version.run_id == best.info.run_id
    assert version.source in (f"models:/{model_id}", client.get_logged_model(model_id).artifact_location)
    tags = version.tags
    objective = "eval/perplexity/written"
    assert tags[register.TAG_OBJECTIVE] == objective
    assert float(tags[register.TAG_OBJECTIVE_VALUE]) == pytest.approx(float(parent.data.tags["sweep.best_value"]))
    assert float(tags[f"metric.{objective}"]) == pytest.approx(best.data.metrics[objective])
    assert f"metric.{objective.replace('written', 'spoken')}" in tags and "metric.train/loss" in tags
    assert not [k for k in tags if k.startswith("metric.system/")]
    assert tags[register.TAG_RUN] == best.info.run_id and tags[TAG_MODEL] == model_id
    assert tags[register.TAG_PARENT] == parent.info.run_id and tags["atm.sweep"] == "bench_pruning"
    assert tags["atm.input.tokenizer_run"] == tokenizer.info.run_id
    assert tags["atm.config_hash"] == best.data.tags["atm.config_hash"]
    assert tags["optuna.trial_number"] == parent.data.tags["sweep.best_trial"]
    assert f"#/experiments/{experiment.experiment_id}/runs/{best.info.run_id}" in version.description
    assert tokenizer.info.run_id in version.description and objective in version.description
    assert parent.data.tags[register.TAG_REGISTERED] == f"{REGISTERED}/1"
    assert "#/models/tiny%20teacher/versions/1" in parent.data.tags["mlflow.note.content"]

    # MLflow 3.17 resolves models:/<name>/<version> in the process's registry (its tracking URI), whatever
    # tracking_uri/registry_uri download_artifacts is given
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", rest.uri)  # this process only
    local = mlflow.artifacts.download_artifacts(f"models:/{REGISTERED}/1", dst_path=str(tmp_path / "registered"))
    assert transformers.AutoModelForMaskedLM.from_pretrained(local).num_parameters() > 0

    env = {**data_env, "MLFLOW_TRACKING_URI": rest.uri}
    again = _register_cli(["--study", "bench_pruning", "--name", REGISTERED, "--storage",
                           f"sqlite:///{sweep_dir}/optuna.db"], tmp_path, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.startswith(f"already registered: {REGISTERED} version 1:"), again.stdout
    assert len(client.search_model_versions(f"name = '{REGISTERED}'")) == 1
    (other,) = [r for r in runs if r.info.run_id != best.info.run_id and r.data.tags.get("mlflow.parentRunId")
                == parent.info.run_id]
    second = _register_cli(["--run", other.info.run_id, "--name", REGISTERED], tmp_path, env)
    assert second.returncode == 0, second.stderr[-2000:]
    versions = {v.version: v.run_id for v in client.search_model_versions(f"name = '{REGISTERED}'")}
    assert versions == {"1": best.info.run_id, "2": other.info.run_id}
    assert client.get_run(parent.info.run_id).data.tags[register.TAG_REGISTERED] == f"{REGISTERED}/1"


def test_registering_a_run_without_a_model_is_one_line(rest, data_env, tmp_path):
    """A run with no logged model (the tokenizer run, or the sweep parent): exit 2, one ``error:`` line naming the
    run, and no version added."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(rest.uri)
    runs = client.search_runs([client.get_experiment_by_name("atm").experiment_id])
    (tokenizer,) = [r for r in runs if r.data.tags.get("atm.stage") == "train_tokenizer"]
    before = len(client.search_model_versions(f"name = '{REGISTERED}'"))
    result = _register_cli(["--run", tokenizer.info.run_id, "--name", REGISTERED], tmp_path,
                           {**data_env, "MLFLOW_TRACKING_URI": rest.uri})
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: run {tokenizer.info.run_id} (train_tokenizer) has no logged model"), lines
    assert len(client.search_model_versions(f"name = '{REGISTERED}'")) == before


def test_screenshots_need_chromium(tmp_path, data_env):
    """Without Chromium on PATH the screenshot script says which package to install: exit 2, one line."""
    env = {**data_env, "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "screenshots.py"),
                             "--out", str(tmp_path / "png")], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: no Chromium on PATH") and "Debian package chromium" in lines[0], lines
    assert not (tmp_path / "png").exists()


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome",
                                                      "chromium-headless-shell")), reason="no Chromium installed")
def test_screenshots_of_the_sweep(rest, tmp_path):
    """``tools/screenshots.py`` against the running server writes the runs page, the sweep parent's, its best
    trial's and the registered version's pages as PNGs of the window's size."""
    out = tmp_path / "png"
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "screenshots.py"),
                             "--tracking-uri", rest.uri, "--out", str(out), "--window-size", "1280,800",
                             "--wait-ms", "6000"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    names = {"runs.png", "sweep.png", "best_trial.png", "registered_model.png"}
    assert {p.name for p in out.iterdir()} == names
    for name in names:
        head = (out / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (1280, 800), name


def test_a_failed_registration_keeps_the_sweep(rest, caplog, monkeypatch):
    """The end-of-sweep registration of a best trial without a logged model (here: a study whose only trial is the
    tokenizer run) warns in one line naming the retry command, raises nothing and registers nothing."""
    import logging

    import mlflow
    import optuna
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from atm.sweeps import RUN_ATTR, register

    client = MlflowClient(rest.uri)
    runs = client.search_runs([client.get_experiment_by_name("atm").experiment_id])
    (tokenizer,) = [r for r in runs if r.data.tags.get("atm.stage") == "train_tokenizer"]
    study = optuna.create_study(study_name="no_model")
    study.add_trial(optuna.trial.create_trial(value=1.0, user_attrs={RUN_ATTR: tokenizer.info.run_id}))
    before = len(client.search_model_versions(f"name = '{REGISTERED}'"))
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", rest.uri)  # this process only
    with caplog.at_level(logging.WARNING, logger="atm.sweeps.register"):
        register.after_sweep(study, OmegaConf.create({"tracking": {"register_best": REGISTERED}}), None)
    (record,) = [r for r in caplog.records if r.name == "atm.sweeps.register"]
    assert "has no logged model" in record.getMessage() and "python -m atm.sweeps.register --study no_model" in \
        record.getMessage() and "\n" not in record.getMessage(), record.getMessage()
    assert len(client.search_model_versions(f"name = '{REGISTERED}'")) == before
