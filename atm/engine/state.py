"""Resumable training state: what :func:`atm.engine.loop.fit` needs to continue a run exactly after a crash.

Every ``trainer.state_every`` optimiser steps ``fit`` writes ``<trainer.state_dir>/<MLflow run id>/step-<N>/``:

* ``model.safetensors`` — the weights of everything trained (safetensors; tied weights stored once);
* ``trainer.pt`` — optimizer and scheduler state, the RNG states of every rank (Python, NumPy, torch CPU
  and CUDA; they drive dropout and MLM masking), the data position of the batch stream, the step, the
  running loss window and the state of callbacks that have one — only tensors, numbers, strings, lists
  and dicts, read back with ``torch.load(weights_only=True)`` (nothing is unpickled);
* ``manifest.json`` — format, step, world size and the size and sha256 of each file.

A state is written into a temporary directory, fsynced, then renamed (:func:`atm.files.atomic_dir`), so a
crash leaves either a complete state or none; a full disk raises a one-line :class:`AtmError` naming the file and
leaves nothing. The newest ``trainer.keep_last`` states are kept: older ones are first renamed out of sight
(``.step-<N>.del-*``, oldest first), then deleted, so no reader ever sees a half-deleted state, and leftovers of a
killed writer or pruner are removed by the next save. SIGINT (Ctrl-C) is held back while a state is written or
pruned (:func:`deferred_sigint`) and delivered when that is done. Loading verifies
the manifest: a missing, truncated or corrupt file raises a one-line :class:`AtmError` naming the file and
the previous state. atm does **not** fall back to an older state by itself (that would silently retrain
steps and hide a disk problem) and never deletes a state it cannot read: delete the bad ``step-<N>``
directory to resume from the one before.

While a process trains a run it holds an exclusive ``flock`` on ``<run dir>/.lock`` (released by the
kernel when the process dies, even by SIGKILL), so a run is resumable only when nobody trains it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from atm.errors import AtmError
from atm.files import atomic_dir, file_lock, is_locked

PREFIX = "step-"
MANIFEST = "manifest.json"
MODEL = "model.safetensors"
TRAINER = "trainer.pt"
FORMAT = 1
_LOCK = ".lock"


def run_state_dir(trainer_cfg: DictConfig, run_id: str | None = None) -> Path | None:
    """``<trainer.state_dir>/<run id>`` (default: the active MLflow run), or None when ``trainer.state_every``
    is unset (no resumable state)."""
    if not trainer_cfg.get("state_every"):
        return None
    if run_id is None:
        import mlflow

        run = mlflow.active_run()
        if run is None:
            return None
        run_id = run.info.run_id
    return Path(trainer_cfg.state_dir) / run_id


def resumable_run(cfg: DictConfig, experiment_id: str, stage: str, hash_: str) -> str | None:
    """The MLflow run a restarted command continues: the newest unfinished run of ``stage`` with config hash
    ``hash_`` that has a state and no live trainer (:func:`atm.tracking.find_resumable_run`); None when
    ``trainer.resume`` or ``trainer.state_every`` is off, or for a sweep trial (Optuna starts a new trial)."""
    from atm import tracking

    trainer = cfg.get("trainer")
    if trainer is None or not trainer.get("resume") or not trainer.get("state_every") or cfg.get("optuna"):
        return None
    return tracking.find_resumable_run(experiment_id, stage, hash_,
                                       lambda run_id: resumable(run_state_dir(trainer, run_id)))


def _step_of(path: Path) -> int | None:
    name = path.name
    if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() and path.is_dir():
        return int(name[len(PREFIX):])
    return None


def states(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every state of a run directory, oldest first (temporary dirs ignored)."""
    if not run_dir.is_dir():
        return []
    found = [(_step_of(p), p) for p in run_dir.iterdir()]
    return sorted((s, p) for s, p in found if s is not None)


def latest(run_dir: Path) -> Path | None:
    """The newest state directory of ``run_dir``, or None."""
    found = states(run_dir)
    return found[-1][1] if found else None


# ---------------------------------------------------------------- ownership of a run (one trainer at a time)

def is_claimed(run_dir: Path) -> bool:
    """True while a live process trains this run (it holds the run directory's lock)."""
    return is_locked(run_dir / _LOCK)


def resumable(run_dir: Path) -> bool:
    """A run can be resumed: it has a state and no live process trains it."""
    return latest(run_dir) is not None and not is_claimed(run_dir)


@contextmanager
def claim(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock while training. Raises AtmError if another process holds it."""
    with ExitStack() as stack:
        try:
            stack.enter_context(file_lock(run_dir / _LOCK, blocking=False))
        except BlockingIOError:
            raise AtmError(f"training state {run_dir} is in use by another process training the same run") from None
        yield


# ---------------------------------------------------------------- RNG states

def capture_rng() -> dict[str, Any]:
    """The global RNG states (Python ``random``, NumPy legacy, torch CPU and every CUDA device) as plain
    data (lists, ints, tensors) that ``torch.load(weights_only=True)`` reads back."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned."""
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save / load

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold SIGINT back for the block: a Ctrl-C arriving inside it is delivered (``KeyboardInterrupt`` from
    Python's default handler, or the handler that was installed) when the block has ended normally.

    Only the main thread receives signals; elsewhere (and when no Python handler can be installed) the block
    runs unchanged. When the block raises, its exception wins and the held-back SIGINT is dropped.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous != signal.SIG_IGN:  # SIG_DFL, or a handler not installed from Python
            raise KeyboardInterrupt


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (raises OSError, e.g. ENOSPC, naming nothing)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_error(err: OSError, final: Path) -> AtmError:
    """The one-line error of a failed state write; ``err.filename`` is a temporary name, ``final`` is named."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return AtmError(f"no space left on device writing training state {final} (nothing was kept; free space "
                        "and rerun the same command to resume from the previous state)")
    return AtmError(f"cannot write training state {final}: {err.strerror or err}")


def save(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any],
         keep_last: int | None, world_size: int = 1) -> Path:
    """Write state ``step`` atomically under ``run_dir`` and apply the retention limit (:func:`prune`).

    The caller must own the run (:func:`claim`): leftovers of killed writers are deleted. SIGINT is held
    back until the state is written and pruned (:func:`deferred_sigint`).

    Args:
        model_state: ``module.state_dict()`` of everything trained (tensors; tied tensors are stored once).
        trainer_state: plain data for ``trainer.pt`` (see the module doc).
        keep_last: keep this many newest states (None or 0: all).

    Returns:
        The state directory ``run_dir/step-<step>``.

    Raises:
        AtmError: the state cannot be written (``"no space left on device writing training state <dir> ..."``
            for a full disk or quota); nothing of it is left behind and older states are kept.
    """
    final = run_dir / f"{PREFIX}{step:06d}"
    with deferred_sigint():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not final.exists():  # else written before a crash by the same (deterministic) run
                _write_state(final, step, model_state, trainer_state, world_size)
        except OSError as err:
            raise _write_error(err, final) from None
        prune(run_dir, keep_last)
    return final


def _write_state(final: Path, step: int, model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any],
                 world_size: int) -> None:
    """Serialise in memory, then write and fsync the files into a temporary directory renamed to ``final``
    (writes raise plain ``OSError``: safetensors' and torch's own file writers hide ENOSPC)."""
    from safetensors.torch import save as safetensors_bytes

    unique, seen = {}, {}
    for name, tensor in model_state.items():  # tied weights: store the first name only
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        unique[name] = tensor.detach().cpu().contiguous()
    tied = {n: seen[(t.data_ptr(), t.dtype, tuple(t.shape))] for n, t in model_state.items()
            if t.numel() and n not in unique}
    buffer = io.BytesIO()
    torch.save(trainer_state, buffer)
    data = {MODEL: safetensors_bytes(unique, metadata={"tied": json.dumps(tied)}), TRAINER: buffer.getvalue()}
    files = {name: {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()} for name, blob in data.items()}
    data[MANIFEST] = json.dumps({"format": FORMAT, "step": step, "world_size": world_size, "files": files},
                                indent=1).encode()
    # replace=False: a complete copy of this step that appeared meanwhile is kept
    with atomic_dir(final, replace=False, durable=True) as tmp:  # fsyncs the directory and its parent
        for name, blob in data.items():
            _write(tmp / name, blob)


def prune(run_dir: Path, keep_last: int | None) -> None:
    """Keep the newest ``keep_last`` states of ``run_dir`` (None or 0: all), atomically for every reader.

    Each older state is renamed out of sight first (``.step-<N>.del-<id>``; oldest first, so a process killed
    between two renames still leaves the newest states), then deleted with every such leftover and every
    temporary directory a killed writer left (``.step-<N>.tmp-*``). The caller must own the run (:func:`claim`).
    """
    if keep_last:
        for _, old in states(run_dir)[:-keep_last]:
            os.replace(old, run_dir / f".{old.name}.del-{uuid.uuid4().hex[:8]}")
    for leftover in run_dir.glob(f".{PREFIX}*"):
        if leftover.is_dir() and (".del-" in leftover.name or ".tmp-" in leftover.name):
            shutil.rmtree(leftover, ignore_errors=True)


def load(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read and verify a state written by :func:`save`.

    Returns:
        ``(model_state, trainer_state, manifest)``; ``model_state`` maps every parameter/buffer name
        (tied names included) to a CPU tensor.

    Raises:
        AtmError: (one line, naming the file and the previous state) the manifest is missing or
            unreadable, a file is missing, truncated or its sha256 differs, or a file cannot be parsed.
            Nothing is deleted.
    """
    from safetensors import SafetensorError, safe_open

    previous = [p for s, p in states(state_dir.parent) if p != state_dir and s < (_step_of(state_dir) or 0)]
    hint = (f"; delete {state_dir} to resume from {previous[-1].name}" if previous
            else f"; delete {state_dir} to start the run over")

    def bad(path: Path, why: str) -> AtmError:
        return AtmError(f"training state {path}: {why}{hint}")

    manifest_path = state_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise bad(manifest_path, "missing (incomplete state)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise bad(manifest_path, f"unreadable ({err})") from None
    if manifest.get("format") != FORMAT:
        raise bad(manifest_path, f"format {manifest.get('format')!r}, this atm reads format {FORMAT}")
    for name in (MODEL, TRAINER):
        path = state_dir / name
        if name not in files:
            raise bad(manifest_path, f"lists no {name}")
        if not path.is_file():
            raise bad(path, "missing")
        size = path.stat().st_size
        if size != files[name]["bytes"]:
            raise bad(path, f"{size} bytes, the manifest says {files[name]['bytes']} (truncated or corrupt)")
        if _sha256(path) != files[name]["sha256"]:
            raise bad(path, "sha256 differs from the manifest (corrupt)")
    try:
        with safe_open(str(state_dir / MODEL), framework="pt") as handle:
            model_state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
            tied = json.loads((handle.metadata() or {}).get("tied", "{}"))
        model_state.update({name: model_state[source] for name, source in tied.items()})
    except (SafetensorError, KeyError, ValueError) as err:
        raise bad(state_dir / MODEL, f"unreadable ({str(err).splitlines()[0]})") from None
    try:
        trainer_state = torch.load(state_dir / TRAINER, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise bad(state_dir / TRAINER, f"unreadable ({str(err).splitlines()[0]})") from None
    return model_state, trainer_state, manifest
