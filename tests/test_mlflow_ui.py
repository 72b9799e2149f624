"""The MLflow UI as the researcher's home (issue 15): what a tiny sweep leaves in a fresh store, read back through
``mlflow server``'s REST API as the UI reads it: the experiment's kind (the UI opens on training runs), the trials
nested under the sweep's parent run, the datasets each run read, each run's description linking its inputs' runs,
the parent's description naming the best trial and showing the report's plots; and MLflow system metrics.
"""

from __future__ import annotations

import json
import os
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


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, data_env):
    """A fresh working directory where a 2-trial sweep ran (lineage trained the tokenizer first)."""
    cwd = tmp_path_factory.mktemp("ui-sweep")
    result = atm_train(["-m", "+sweep=bench_pruning", *TINY, f"hydra.sweeper.n_trials={N_TRIALS}",
                        "hydra.sweeper.pruner.name=none", f"hydra.sweeper.storage=sqlite:///{cwd}/optuna.db",
                        f"hydra.sweep.dir={cwd}/sweep"], cwd, data_env)
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
    settings (a value a minute) the sweep's runs, all shorter than a minute, have none."""
    from mlflow.tracking import MlflowClient

    result = atm_train(["stage=train_tokenizer", *TINY, "tracking.system_metrics_interval=0.2",
                        "tracking.system_metrics_log_every=0.4"], tmp_path, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("atm").experiment_id])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    experiment = rest("GET", "experiments/get-by-name?experiment_name=atm")["experiment"]
    runs = rest("POST", "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    assert runs and not [m["key"] for r in runs for m in r["data"].get("metrics", []) if m["key"].startswith("system/")]
