"""Shared test setup: real data from the mirror, tiny configs, CLI subprocess helpers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("ATM_DATA_MIRROR") or REPO.parent / "shared" / "data")

# A tiny pipeline: every stage runs in seconds on 2 CPU cores. `trainer` and `eval` are inherited by the
# inputs lineage trains, so teachers are tiny too.
TINY = [
    "lineage.inherit=[lineage,data,tokenizer,tracking,trainer,eval,distill.switch]", "distill.switch.steps=3",
    "tokenizer.vocab_size=2000", "tokenizer.character_coverage=0.98", "tokenizer.max_lines_per_source=60",
    "data.written.max_lines_per_source=40", "data.spoken.max_lines_per_source=40",
    "data.heldout.max_lines_per_lang=4", "data.max_seq_len=32",
    "trainer.max_steps=6", "trainer.batch_size=8", "trainer.save_every=2", "trainer.log_every=2",
    "trainer.warmup_steps=1",
    "eval.perplexity.max_lines_per_lang=4", "eval.mask_fill.languages=[en,de]",
    "eval.mask_fill.max_sentences_per_lang=4", "eval.xnli.train_pairs=24", "eval.xnli.batch_size=8",
    "eval.xnli.max_test_pairs_per_lang=8", "eval.xnli.max_seq_len=48",
    "finetune.max_train_per_locale=48", "finetune.max_eval_per_locale=24",
]

# `+experiment=alexatm_mini` (or its GPU configuration) at tiny scale: every job and input in seconds. The job
# settings (eval, finetune) are inherited by the inputs lineage trains, so they are tiny too.
TINY_EXPERIMENT_SETTINGS = [
    "alexatm.steps.stage1=4", "alexatm.steps.stage2=4", "alexatm.steps.intermediate=4", "alexatm.steps.switch=2",
    "alexatm.steps.final=4", "alexatm.steps.finetune=4", "alexatm.save_every.stage1=2", "alexatm.save_every.stage2=2",
    "tokenizer.vocab_size=2000", "tokenizer.character_coverage=0.98", "tokenizer.max_lines_per_source=60",
    "data.written.max_lines_per_source=40", "data.spoken.max_lines_per_source=40",
    "data.heldout.max_lines_per_lang=4", "data.max_seq_len=32", "eval.perplexity.max_lines_per_lang=4",
    "finetune.max_train_per_locale=16", "finetune.max_eval_per_locale=12", "finetune.seeds=[0]",
    "eval.xnli.train_pairs=32", "eval.xnli.max_test_pairs_per_lang=12",
]


def tiny_experiment(experiment: str = "alexatm_mini", inherit: tuple[str, ...] = ()) -> list[str]:
    """Overrides of ``+experiment=<experiment>`` at tiny scale; ``inherit``: more ``lineage.inherit`` prefixes."""
    prefixes = ["lineage", "data", "tokenizer", "tracking", *inherit, "experiment", "alexatm", "eval", "finetune"]
    return [f"+experiment={experiment}", f"lineage.inherit=[{','.join(prefixes)}]", *TINY_EXPERIMENT_SETTINGS]


@pytest.fixture(scope="module")
def real_data_env(tmp_path_factory):
    """In-process: point atm.data at the real data mirror and a session-wide cache; yields the mirror."""
    if not MIRROR.is_dir():
        pytest.skip(f"real data mirror {MIRROR} not found (set ATM_DATA_MIRROR)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATM_DATA_MIRROR", str(MIRROR))
        mp.setenv("ATM_DATA_DIR", str(tmp_path_factory.getbasetemp() / "atm-data-tests"))
        yield MIRROR


@pytest.fixture(scope="session")
def data_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses: the real data mirror and a session-wide data cache."""
    if not MIRROR.is_dir():
        pytest.skip(f"real data mirror {MIRROR} not found (set ATM_DATA_MIRROR)")
    env = dict(os.environ)
    env.update(ATM_DATA_MIRROR=str(MIRROR), ATM_DATA_DIR=str(tmp_path_factory.mktemp("atm-data")),
               PYTHONPATH=str(REPO), HYDRA_FULL_ERROR="0", TQDM_DISABLE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def sigint_as_in_a_terminal() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: a command typed in a terminal starts with
    SIGINT at its default action, but one started by a background job (``nohup pytest ... &``, some CI runners)
    inherits it ignored, and Python then never raises KeyboardInterrupt (as the shell convention wants). The
    child is put in the terminal user's state, whatever state pytest was started in."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def atm_train(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m atm.train <args>`` as a real subprocess in ``cwd``."""
    return subprocess.run([sys.executable, "-m", "atm.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def trained_store(tmp_path_factory, env: dict[str, str], name: str, args: list[str]) -> Path:
    """A fresh working directory in which ``python -m atm.train <args>`` has run (and succeeded)."""
    cwd = tmp_path_factory.mktemp(name)
    result = atm_train(args, cwd, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd


def finished_runs_by_stage(root: Path, experiment_id: str = "1") -> dict[str, list[Any]]:
    """The runs of ``<root>/mlflow.db`` by their ``atm.stage`` tag, oldest first; every one must be FINISHED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    runs: dict[str, list[Any]] = {}
    for run in client.search_runs([experiment_id], order_by=["attributes.start_time ASC"], max_results=5000):
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
        runs.setdefault(run.data.tags["atm.stage"], []).append(run)
    return runs


def mlflow_store(root: Path, experiment: str = "atm") -> tuple[str, Any, str]:
    """A throw-away SQLite MLflow store ``<root>/mlflow.db`` with one empty experiment (artifacts under
    ``<root>/artifacts``); returns ``(tracking URI, MlflowClient, experiment id)``."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    return uri, client, client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
