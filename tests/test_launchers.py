"""Hydra launchers under the atm_optuna sweeper: joblib (parallel local trials), submitit_local, and atm's
SLURM preset ``conf/hydra/launcher/slurm.yaml``.

The sweeps run a small app written into ``tmp_path`` in real subprocesses. Its jobs meet at a barrier:
each job announces itself and waits for the other job of its batch, so a launcher that ran the batch one
job after the other fails the trials instead of passing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]

APP = '''
import json, os, time
from pathlib import Path

import hydra


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg) -> float:
    out = Path(cfg.out)
    number = cfg.optuna.trial_number
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{number}.started").write_text(str(os.getpid()))
    batch = range(number - number % 2, number - number % 2 + 2)
    deadline = time.monotonic() + cfg.wait
    while not all((out / f"{n}.started").exists() for n in batch):
        if time.monotonic() > deadline:
            raise RuntimeError(f"trial {number}: the other job of its batch never started")
        time.sleep(0.05)
    (out / f"{number}.json").write_text(json.dumps({"pid": os.getpid(), "x": cfg.x}))
    return (cfg.x - 1.0) ** 2


if __name__ == "__main__":
    main()
'''

CONFIG = '''
defaults:
  - _self_
  - override hydra/sweeper: atm_optuna
x: 0.0
out: null
wait: 60   # seconds a job waits for the other job of its batch
hydra:
  sweeper:
    n_trials: 4
    n_jobs: 2
    sampler: {name: random, seed: 0}
    params:
      x: interval(-2.0, 2.0)
'''


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "conf").mkdir(exist_ok=True)
    (tmp_path / "conf" / "config.yaml").write_text(CONFIG)
    (tmp_path / "app.py").write_text(APP)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "app.py", "-m", f"hydra.sweep.dir={tmp_path / 'multirun'}",
           f"out={tmp_path / 'out'}", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


def check_study(tmp_path: Path) -> dict[int, dict]:
    """The 4 trials completed with the app's values; returns each job's record by trial number."""
    study = optuna.load_study(study_name="app", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    records = {t.number: json.loads((tmp_path / "out" / f"{t.number}.json").read_text()) for t in study.trials}
    for t in study.trials:
        assert records[t.number]["x"] == pytest.approx(t.params["x"])
        assert t.value == pytest.approx((t.params["x"] - 1.0) ** 2)
    return records


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_launcher_runs_each_batch_of_trials_in_parallel(tmp_path, launcher):
    pytest.importorskip(f"hydra_plugins.hydra_{launcher.split('_')[0]}_launcher",
                        reason="pip install -e '.[launchers]'")
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=5"]
    proc = sweep(tmp_path, f"hydra/launcher={launcher}", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = check_study(tmp_path)
    # separate worker processes, not the sweeping process
    assert len({r["pid"] for r in records.values()}) >= 2
    if launcher == "submitit_local":
        assert len(list((tmp_path / "multirun" / ".submitit").glob("*/*_result.pkl"))) == 4


def test_basic_launcher_runs_a_batch_one_job_after_the_other(tmp_path):
    # the control: Hydra's default launcher, so the first job of the batch waits in vain
    proc = sweep(tmp_path, "hydra.sweeper.n_trials=2", "wait=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="app", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert "trial 0: the other job of its batch never started" in proc.stdout + proc.stderr


def test_slurm_preset_composes_with_atm_config():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[launchers]'")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "+sweep=distill_losses"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
    assert cfg.hydra.sweeper._target_.endswith("AtmOptunaSweeper")
