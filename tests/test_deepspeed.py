"""The DeepSpeed backend of ``fit`` on CPU (gloo): one and two processes give the loss and weights of the plain
PyTorch loop with the same global batch; a two-process run resumes exactly from atm's state; the CLI trains
a stage with ``trainer=deepspeed``; a DeepSpeed config that contradicts the trainer config is a one-line error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, atm_train
from omegaconf import OmegaConf

from atm.engine.deepspeed import ds_config
from atm.errors import AtmError

pytest.importorskip("deepspeed")
APP = REPO / "tests" / "deepspeed_app.py"


def _env(base: dict) -> dict:
    env = dict(base)
    env.update(PYTHONPATH=str(REPO), TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _app(tmp: Path, name: str, args: list, nproc: int = 1, state_dir: Path | None = None) -> dict:
    import os

    out = tmp / f"{name}.json"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, str(APP), str(out), *map(str, args), *([str(state_dir)] if state_dir else [])]
    result = subprocess.run(cmd, check=False, cwd=tmp, env=_env(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def _close(a: dict, b: dict, tol: float = 1e-5) -> None:
    import torch

    assert b["loss"] == pytest.approx(a["loss"], rel=tol)
    for name, value in a["params"].items():
        assert torch.allclose(torch.tensor(value), torch.tensor(b["params"][name]), atol=tol, rtol=tol), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The plain loop, one process, batch 8 (in this process: the torch backend needs no process group)."""
    sys.path.insert(0, str(APP.parent))
    import deepspeed_app

    out = tmp_path_factory.mktemp("ds-ref") / "ref.json"
    deepspeed_app.main(str(out), "torch", 8, 1, 0)
    return json.loads(out.read_text())


def test_one_process_zero1_with_accumulation_matches_plain_loop(tmp_path, reference):
    # 1 process x batch 4 x 2 accumulation steps = the global batch of 8
    _close(reference, _app(tmp_path, "zero1", ["deepspeed", 4, 2, 1]))


def test_two_processes_match_one_and_resume_exactly(tmp_path, reference):
    # 2 processes x batch 4 = the global batch of 8, ZeRO-2: optimizer state and gradients partitioned
    state_dir = tmp_path / "state"
    _close(reference, _app(tmp_path, "two", ["deepspeed", 4, 1, 2], nproc=2, state_dir=state_dir))
    assert sorted(p.name for p in state_dir.iterdir() if not p.name.startswith(".")) == ["step-000008",
                                                                                          "step-000012"]
    shutil.rmtree(state_dir / "step-000012")  # as if killed in step 9..12: resume from step 8 on 2 processes
    resumed = _app(tmp_path, "resumed", ["deepspeed", 4, 1, 2], nproc=2, state_dir=state_dir)
    assert resumed["steps_trained"] == [9, 10, 11, 12]
    _close(reference, resumed)


def test_cli_stage_with_deepspeed_matches_plain_backend(tmp_path, data_env):
    import mlflow
    from mlflow.tracking import MlflowClient

    env = _env(data_env)
    ds = atm_train(["stage=pretrain_stage1", *TINY, "trainer=deepspeed"], tmp_path, env)
    assert ds.returncode == 0, ds.stderr[-3000:]
    plain = atm_train(["stage=pretrain_stage1", *TINY], tmp_path, env)  # reuses the tokenizer lineage trained
    assert plain.returncode == 0, plain.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("atm").experiment_id],
                              filter_string="tags.`atm.stage` = 'pretrain_stage1'")
    by_backend = {r.data.params["trainer.backend"]: r for r in runs}
    assert set(by_backend) == {"torch", "deepspeed"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert by_backend["deepspeed"].data.metrics["trainer/world_size"] == 1.0
    history = {b: [m.value for m in client.get_metric_history(r.info.run_id, "train/loss")]
               for b, r in by_backend.items()}
    assert len(history["deepspeed"]) == 3  # log_every=2, 6 steps
    assert history["deepspeed"] == pytest.approx(history["torch"], rel=1e-4)


def _trainer(**over) -> OmegaConf:
    base = {"batch_size": 8, "grad_accum_steps": 2, "grad_clip": 1.0, "precision": "bf16",
            "deepspeed": {"zero_stage": 2, "config": None}}
    return OmegaConf.create({**base, **over})


def _user_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ds.json"
    path.write_text(text)
    return str(path)


def test_ds_config_maps_trainer_keys_and_keeps_user_extras(tmp_path):
    user = _user_config(tmp_path, json.dumps({"gradient_clipping": 1.0, "train_batch_size": "auto",
                                              "zero_optimization": {"stage": 2, "overlap_comm": True}}))
    cfg = ds_config(_trainer(deepspeed={"zero_stage": 2, "config": user}), world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 64 and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}


@pytest.mark.parametrize(("user", "expected"), [
    ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 contradicts trainer.grad_clip=1.0"),
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4 contradicts trainer.batch_size=8"),
    ({"train_batch_size": 48}, "train_batch_size=48 contradicts trainer.batch_size x trainer.grad_accum_steps"),
    ({"fp16": {"enabled": True}}, "fp16.enabled=true contradicts trainer.precision=bf16"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3 contradicts trainer.deepspeed.zero_stage=2"),
    ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
])
def test_contradicting_ds_config_is_one_line_error(tmp_path, user, expected):
    path = _user_config(tmp_path, json.dumps(user))
    with pytest.raises(AtmError) as err:
        ds_config(_trainer(deepspeed={"zero_stage": 2, "config": path}), world_size=2)
    assert expected in str(err.value) and path in str(err.value) and "\n" not in str(err.value)


def test_invalid_ds_json_names_file_and_line(tmp_path):
    path = _user_config(tmp_path, '{\n  "gradient_clipping": 1.0,\n  oops\n}')
    with pytest.raises(AtmError, match=rf"{path}:3: not valid JSON"):
        ds_config(_trainer(deepspeed={"zero_stage": 2, "config": path}))


def test_cli_contradiction_fails_before_training(tmp_path, data_env):
    path = _user_config(tmp_path, json.dumps({"gradient_clipping": 0.25}))
    result = atm_train(["stage=pretrain_stage1", *TINY, "trainer=deepspeed", f"trainer.deepspeed.config={path}"],
                       tmp_path, _env(data_env))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {path}: gradient_clipping=0.25 contradicts trainer.grad_clip=1.0")
    assert not (tmp_path / "mlflow.db").exists()  # checked before any run, input or training
