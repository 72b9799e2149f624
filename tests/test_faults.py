"""One line for every fault, nothing half-written: truncated data in the mirror, SIGINT during training, during
a training-state write and during pruning, SIGKILL during pruning, a full disk while writing a state, a
read-only working directory.

Real processes and real signals: a ``python -m atm.train`` subprocess interrupted with SIGINT mid-training,
child Python processes that signal themselves inside :func:`atm.engine.state.save`, a size-limited tmpfs (as
root) or ``RLIMIT_FSIZE`` for a full disk, a copy of the real data mirror with one file cut short.
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import MIRROR, REPO, TINY, mlflow_store, sigint_as_in_a_terminal
from omegaconf import OmegaConf

from atm.data import fetch as F
from atm.data.text import read_jsonl
from atm.engine import state as S
from atm.engine.loop import fit
from atm.errors import AtmError, Interrupted

XNLI_TRAIN = "xnli/hf_jsonl/en/train.jsonl.gz"


def _mirror_with(tmp: Path, rel: str, content: bytes) -> Path:
    """A mirror whose files are links into the real mirror, except ``rel``, which holds ``content``."""
    if not MIRROR.is_dir():
        pytest.skip(f"real data mirror {MIRROR} not found (set ATM_DATA_MIRROR)")
    mirror = tmp / "mirror"
    parts = Path(rel).parts
    for depth in range(len(parts)):  # link every sibling along the path to rel, make its directories
        here, real = mirror.joinpath(*parts[:depth]), MIRROR.joinpath(*parts[:depth])
        here.mkdir(parents=True, exist_ok=True)
        for child in real.iterdir():
            if child.name != parts[depth] and not (here / child.name).exists():
                (here / child.name).symlink_to(child)
    (mirror / rel).write_bytes(content)
    return mirror


@pytest.fixture
def terminal_sigint():
    """In this process: SIGINT raises KeyboardInterrupt (Python's handler), as in a terminal; restored after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())


# ---------------------------------------------------------------- truncated data


def test_truncated_gz_in_mirror_is_one_line_naming_it_and_is_never_cached(tmp_path, monkeypatch):
    whole = (MIRROR / XNLI_TRAIN).read_bytes() if MIRROR.is_dir() else b""
    mirror = _mirror_with(tmp_path, XNLI_TRAIN, whole[: len(whole) // 2])
    cache = tmp_path / "cache"
    monkeypatch.setenv("ATM_DATA_MIRROR", str(mirror))
    monkeypatch.setenv("ATM_DATA_DIR", str(cache))
    for _ in range(2):  # the second run fails the same way: nothing was cached
        with pytest.raises(AtmError) as err:
            F.fetch(XNLI_TRAIN)
        message = str(err.value)
        assert "\n" not in message and str(mirror / XNLI_TRAIN) in message
        assert "truncated or corrupt" in message and "nothing was cached" in message
        assert _cache_files(cache) == []  # no copy, no temporary file
    (mirror / XNLI_TRAIN).write_bytes(whole)  # the mirror is repaired: the next run works
    path = F.fetch(XNLI_TRAIN)
    assert path.read_bytes() == whole and sum(1 for _ in read_jsonl(path)) > 1000


def test_truncated_copy_cached_before_validation_is_copied_again_from_a_repaired_mirror(tmp_path, monkeypatch):
    whole = (MIRROR / XNLI_TRAIN).read_bytes() if MIRROR.is_dir() else b""
    mirror = _mirror_with(tmp_path, XNLI_TRAIN, whole)
    cache = tmp_path / "cache"
    (cache / XNLI_TRAIN).parent.mkdir(parents=True)
    (cache / XNLI_TRAIN).write_bytes(whole[:5000])  # a bad copy left by an older atm
    monkeypatch.setenv("ATM_DATA_MIRROR", str(mirror))
    monkeypatch.setenv("ATM_DATA_DIR", str(cache))
    with pytest.raises(AtmError) as err:  # read directly, it names the file and the fix
        list(read_jsonl(cache / XNLI_TRAIN))
    assert "\n" not in str(err.value) and str(cache / XNLI_TRAIN) in str(err.value)
    assert "truncated or corrupt data after line" in str(err.value) and "delete it" in str(err.value)
    assert F.fetch(XNLI_TRAIN).read_bytes() == whole  # the size differs from the mirror's: copied again


@pytest.mark.parametrize("content", [b'{"premise": "a", "hypothesis": "b", "label": 0}\n{"premise": "a", "hyp',
                                     gzip.compress(b"x" * 100)[:-8] + b"\0" * 8])
def test_cut_json_record_or_bad_crc_is_refused_before_the_cache(tmp_path, monkeypatch, content):
    mirror = _mirror_with(tmp_path, XNLI_TRAIN, content)
    monkeypatch.setenv("ATM_DATA_MIRROR", str(mirror))
    monkeypatch.setenv("ATM_DATA_DIR", str(tmp_path / "cache"))
    with pytest.raises(AtmError) as err:
        F.fetch(XNLI_TRAIN)
    assert "\n" not in str(err.value) and str(mirror / XNLI_TRAIN) in str(err.value)
    assert _cache_files(tmp_path / "cache") == []


def test_cli_with_truncated_gz_in_mirror_prints_one_line_and_exits_2(tmp_path, data_env):
    whole = (MIRROR / XNLI_TRAIN).read_bytes()
    mirror = _mirror_with(tmp_path, XNLI_TRAIN, whole[: len(whole) // 3])
    env = {**data_env, "ATM_DATA_MIRROR": str(mirror), "ATM_DATA_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "atm.train", "stage=train_tokenizer", *TINY,
                             f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(mirror / XNLI_TRAIN) in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "EOFError" not in result.stderr
    assert not (tmp_path / "cache" / XNLI_TRAIN).exists()


# ---------------------------------------------------------------- SIGINT during a stage (real CLI)


@pytest.mark.slow  # lineage trains its tokenizer first (minutes on a busy 2-core machine)
def test_sigint_during_training_prints_one_line_and_marks_the_run_killed(tmp_path, data_env):
    store, work = tmp_path, tmp_path / "work"
    work.mkdir()
    args = ["stage=pretrain_stage1", *TINY, "trainer.max_steps=400", "trainer.save_every=null",
            "trainer.state_every=2", "trainer.log_every=1", f"tracking.uri=sqlite:///{store}/mlflow.db"]
    state_root = work / ".atm" / "cache" / "state"
    child = subprocess.Popen([sys.executable, "-m", "atm.train", *args], cwd=work, env=data_env,
                             preexec_fn=sigint_as_in_a_terminal,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900  # lineage trains the tokenizer first
        while not list(state_root.glob("*/step-000002")):
            assert child.poll() is None, f"the run ended before its first state: {child.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no training state appeared"
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert child.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    (line,) = [ln for ln in lines if "interrupted at step" in ln]
    assert "rerun the same command to resume" in line, line
    (run_dir,) = state_root.iterdir()
    assert 0 < len(S.states(run_dir)) <= 2 and not list(run_dir.glob(".step-*"))  # kept: keep_last=2
    assert S.latest(run_dir).name in line
    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("atm")
    (run,) = client.search_runs([exp.experiment_id], filter_string="tags.`atm.stage` = 'pretrain_stage1'")
    assert run.info.status == "KILLED" and run.info.run_id == run_dir.name


# ---------------------------------------------------------------- SIGINT in fit (in process)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).mean(1))


def _stream():
    from atm.data.collate import BatchStream

    def collate(items):
        return {"input_ids": torch.tensor([i["input_ids"] for i in items]),
                "labels": torch.tensor([i["label"] for i in items])}

    return BatchStream([{"input_ids": [i % 50] * 4, "label": i % 3} for i in range(32)], 8, collate, seed=0)


def _cfg(state_dir: Path, **extra):
    return OmegaConf.create({"max_steps": 20, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.0, "warmup_steps": 1,
                             "grad_clip": 1.0, "precision": "fp32", "log_every": 1, "state_every": 3, "keep_last": 2,
                             "state_dir": str(state_dir), "grad_accum_steps": 1, **extra})


def test_sigint_in_fit_raises_interrupted_with_step_and_ends_the_run_killed(tmp_path, terminal_sigint):
    uri, client, experiment = mlflow_store(tmp_path)
    mlflow.set_tracking_uri(uri)
    model = _Tiny()
    run_dir = tmp_path / "state" / "run"

    def interrupt(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as err, mlflow.start_run(experiment_id=experiment) as run:
        fit(model, _stream(), lambda b, s: (torch.nn.functional.cross_entropy(model(b["input_ids"]), b["labels"]), {}),
            _cfg(run_dir), callbacks=[interrupt], state_dir=run_dir)
    assert err.value.step == 5 and err.value.exit_code == 130 and isinstance(err.value, AtmError)
    assert str(err.value).startswith("interrupted at step 5; rerun the same command to resume")
    assert str(run_dir / "step-000003") in str(err.value)
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert mlflow.active_run() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------- state writes and pruning (child processes)

_CHILD = """
import os, signal, shutil, sys, time, torch
from pathlib import Path
from atm.engine import state as S
run_dir = Path(sys.argv[1])
model = {"w": torch.arange(1000, dtype=torch.float32)}
def save(step, keep_last=None):
    return S.save(run_dir, step, model, {"step": step}, keep_last)
"""


def _child(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    script = _CHILD + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], env=env, capture_output=True,
                          preexec_fn=sigint_as_in_a_terminal,
                          text=True, timeout=120, check=False)


def _visible(run_dir: Path) -> list[int]:
    return [s for s, _ in S.states(run_dir)]


def test_sigint_during_state_write_is_delivered_after_the_state_is_complete(tmp_path):
    result = _child(tmp_path, """
        real = S._write
        def write(path, data):  # Ctrl-C arrives while the first file of the state is written
            if path.name == S.MODEL:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            real(path, data)
        S._write = write
        try:
            save(1)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(0)
    """)
    assert result.returncode == 130, result.stderr
    run_dir = tmp_path / "run"
    assert _visible(run_dir) == [1] and not list(run_dir.glob(".step-*"))
    model, trainer, _ = S.load(run_dir / "step-000001")  # complete and verified
    assert torch.equal(model["w"], torch.arange(1000, dtype=torch.float32)) and trainer["step"] == 1


def test_sigint_during_pruning_is_delivered_after_pruning_keep_last_states(tmp_path):
    result = _child(tmp_path, """
        for step in (1, 2, 3):
            save(step)
        real = shutil.rmtree
        def rmtree(path, *args, **kwargs):  # Ctrl-C arrives while an old state is deleted
            if ".del-" in str(path):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)
            real(path, *args, **kwargs)
        S.shutil.rmtree = rmtree
        try:
            save(4, keep_last=2)
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(0)
    """)
    assert result.returncode == 130, result.stderr
    run_dir = tmp_path / "run"
    assert _visible(run_dir) == [3, 4] and not list(run_dir.glob(".step-*"))


def test_sigkill_during_pruning_leaves_keep_last_states_and_the_next_save_clears_the_rest(tmp_path):
    result = _child(tmp_path, """
        for step in (1, 2, 3):
            save(step)
        real = shutil.rmtree
        def rmtree(path, *args, **kwargs):  # killed at the first delete of an old state
            if ".del-" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, *args, **kwargs)
        S.shutil.rmtree = rmtree
        save(4, keep_last=2)
    """)
    assert result.returncode == -signal.SIGKILL, result.stderr
    run_dir = tmp_path / "run"
    assert _visible(run_dir) == [3, 4]  # both old states were renamed away before the first delete
    assert len(list(run_dir.glob(".step-*.del-*"))) == 2
    S.save(run_dir, 5, {"w": torch.zeros(3)}, {"step": 5}, keep_last=2)
    assert _visible(run_dir) == [4, 5] and not list(run_dir.glob(".step-*"))


# ---------------------------------------------------------------- a full disk while writing a state


def _tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")


def test_full_disk_while_writing_a_state_is_one_line_naming_it_and_leaves_nothing(tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, "256k")
    try:
        run_dir = disk / "run"
        S.save(run_dir, 1, {"w": torch.zeros(10)}, {"step": 1}, keep_last=2)
        with pytest.raises(AtmError) as err:
            S.save(run_dir, 2, {"w": torch.zeros(200_000)}, {"step": 2}, keep_last=2)  # 800 kB
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"no space left on device writing training state {run_dir}")
        assert sorted(p.name for p in run_dir.iterdir() if p.name != ".lock") == ["step-000001"]  # nothing partial
        S.load(run_dir / "step-000001")  # the previous state is intact
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_file_size_limit_while_writing_a_state_is_one_line_and_leaves_nothing(tmp_path):
    result = _child(tmp_path, """
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        save(1)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
        model["w"] = torch.zeros(100_000)
        from atm.errors import AtmError
        try:
            save(2, keep_last=1)
        except AtmError as err:
            print(err)
            sys.exit(2)
    """)
    assert result.returncode == 2, result.stderr
    (line,) = result.stdout.splitlines()
    run_dir = tmp_path / "run"
    assert line.startswith(f"cannot write training state {run_dir / 'step-000002'}: File too large")
    assert _visible(run_dir) == [1] and not list(run_dir.glob(".step-*"))


def test_read_only_working_directory_is_one_line_naming_it(tmp_path, data_env):
    """A read-only working directory (a read-only mount: root ignores file modes) is refused with one line naming
    it, before anything is trained."""
    work = tmp_path / "ro"
    _tmpfs(work, "1m", read_only=True)
    try:
        result = subprocess.run([sys.executable, "-m", "atm.train", "stage=train_tokenizer", *TINY,
                                 f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"], cwd=work, env=data_env,
                                capture_output=True, text=True, timeout=600, check=False)
    finally:
        subprocess.run(["umount", str(work)], check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ") and str(work) in lines[0], lines
    assert not (tmp_path / "mlflow.db").exists() or _runs(tmp_path / "mlflow.db") == []


def _runs(db: Path) -> list:
    import sqlite3

    with sqlite3.connect(db) as con:
        return con.execute("SELECT run_uuid, status FROM runs").fetchall()
