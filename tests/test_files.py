"""atm/files.py: atomic files and directories (also against a writer killed by SIGKILL) and inter-process locks.

The lock and kill tests use real subprocesses (``python -c``), since ``flock`` and ``os.replace`` matter only
between processes; each child reports over stdout when it reached the point the test needs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from atm.files import atomic_dir, atomic_path, atomic_write_text, file_lock, is_locked

REPO = Path(__file__).resolve().parents[1]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _child(script: str, *args: str) -> subprocess.Popen:
    """Start ``python -c script args...`` with atm importable; stdin/stdout are pipes (text, line-buffered)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env, text=True, bufsize=1,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def _expect(proc: subprocess.Popen, line: str) -> None:
    got = proc.stdout.readline().strip()
    assert got == line, f"child said {got!r}, expected {line!r} (exit code {proc.poll()})"


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stdin.close()


def _others(directory: Path, *names: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in names)


# ------------------------------------------------------------------------------------------ atomic_path

def test_atomic_path_replaces_target_with_usual_mode(tmp_path):
    target = tmp_path / "sub" / "out.txt"  # the parent is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".") and not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert _others(target.parent, "out.txt") == []
    assert atomic_write_text(target, "again") == target and target.read_text() == "again"
    with atomic_path(target, durable=True) as tmp:
        tmp.write_text("durable")
    assert target.read_text() == "durable" and _others(target.parent, "out.txt") == []


@pytest.mark.parametrize("exists", [True, False])
def test_atomic_path_keeps_old_content_when_block_raises(tmp_path, exists):
    target = tmp_path / "out.txt"
    if exists:
        target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert (target.read_text() if exists else target.exists()) == ("old" if exists else False)
    assert _others(tmp_path, "out.txt") == []  # the temporary file is gone


@pytest.mark.parametrize("exists", [True, False])
def test_killed_writer_leaves_old_or_absent_target(tmp_path, exists):
    """SIGKILL while the temporary file holds half the data: the target is untouched (old or absent), and
    what the writer left behind is a hidden file."""
    target = tmp_path / "out.bin"
    if exists:
        target.write_bytes(b"old")
    proc = _child("""
        import sys, time
        from atm.files import atomic_path
        with atomic_path(sys.argv[1]) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"partial" * 10000)
                handle.flush()
                print("writing", flush=True)
                time.sleep(120)
                handle.write(b"rest")
    """, str(target))
    try:
        _expect(proc, "writing")
    finally:
        _kill(proc)
    assert (target.read_bytes() if exists else target.exists()) == (b"old" if exists else False)
    leftovers = _others(tmp_path, "out.bin")
    assert all(name.startswith(".") for name in leftovers), leftovers


def test_killed_writer_in_a_loop_never_leaves_a_partial_file(tmp_path):
    """A child rewrites the target as fast as it can; killed at an arbitrary moment, the target holds one
    complete version."""
    target = tmp_path / "out.txt"
    proc = _child("""
        import sys
        from atm.files import atomic_write_text
        i = 0
        while True:
            atomic_write_text(sys.argv[1], f"{i:08d}\\n" * 20000)
            if i == 3:
                print("looping", flush=True)
            i += 1
    """, str(target))
    try:
        _expect(proc, "looping")
        time.sleep(0.2)
    finally:
        _kill(proc)
    text = target.read_text()
    first = text[:9]
    assert len(first) == 9 and first.endswith("\n") and text == first * 20000
    assert all(name.startswith(".") for name in _others(tmp_path, "out.txt"))


# ------------------------------------------------------------------------------------------- atomic_dir

def _tree(path: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in path.iterdir()}


def test_atomic_dir_replace(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:  # absent: created
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp.name.startswith(".") and not target.exists()
        (tmp / "a.txt").write_text("1")
    assert _tree(target) == {"a.txt": "1"}
    assert target.stat().st_mode & 0o777 == 0o777 & ~_umask()
    with atomic_dir(target, durable=True) as tmp:  # existing: replaced as a whole (a.txt is gone)
        (tmp / "b.txt").write_text("2")
    assert _tree(target) == {"b.txt": "2"}
    assert _others(tmp_path, "ckpt") == []  # neither the temporary nor the moved-aside old copy is left


def test_atomic_dir_keeps_old_directory_when_block_raises(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("boom")
    assert _tree(target) == {"a.txt": "old"}
    assert _others(tmp_path, "ckpt") == []


def test_atomic_dir_without_replace_keeps_the_first_copy(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target, replace=False) as tmp:  # absent: created
        (tmp / "a.txt").write_text("first")
    with atomic_dir(target, replace=False) as tmp:  # another process got there first: its copy stays
        (tmp / "a.txt").write_text("second")
        (tmp / "b.txt").write_text("second")
    assert _tree(target) == {"a.txt": "first"}
    assert _others(tmp_path, "ckpt") == []


# ------------------------------------------------------------------------------------------------ locks

_HOLDER = """
    import sys
    from atm.files import file_lock
    with file_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    sys.stdin.readline()
"""


def test_is_locked_and_nonblocking_lock_while_another_process_holds_it(tmp_path):
    lock = tmp_path / "run" / ".lock"
    assert not is_locked(lock) and not lock.exists()  # asking creates nothing
    proc = _child(_HOLDER, str(lock))
    try:
        _expect(proc, "locked")
        assert lock.exists() and is_locked(lock)
        with pytest.raises(BlockingIOError), file_lock(lock, blocking=False):
            pass
        assert is_locked(lock)  # the failed attempt did not disturb the holder
        proc.stdin.write("release\n")
        _expect(proc, "released")  # the child is alive, its lock released at the end of the block
        assert not is_locked(lock)
        with file_lock(lock, blocking=False):
            pass
    finally:
        _kill(proc)


def test_lock_of_a_killed_process_is_released(tmp_path):
    lock = tmp_path / ".lock"
    proc = _child(_HOLDER, str(lock))
    try:
        _expect(proc, "locked")
        assert is_locked(lock)
    finally:
        _kill(proc)
    assert not is_locked(lock)


def test_file_lock_excludes_other_processes(tmp_path):
    """Two processes increment a counter file (read, pause, write) under the lock, started together: with
    mutual exclusion no increment is lost."""
    lock, counter = tmp_path / "counter.lock", tmp_path / "counter"
    counter.write_text("0")
    script = """
        import sys, time
        from pathlib import Path
        from atm.files import file_lock
        lock, counter = sys.argv[1], Path(sys.argv[2])
        print("ready", flush=True)
        sys.stdin.readline()
        for _ in range(40):
            with file_lock(lock):
                value = int(counter.read_text())
                time.sleep(0.002)
                counter.write_text(str(value + 1))
        print("done", flush=True)
    """
    procs = [_child(script, str(lock), str(counter)) for _ in range(2)]
    try:
        for proc in procs:
            _expect(proc, "ready")
        for proc in procs:
            proc.stdin.write("go\n")
        for proc in procs:
            _expect(proc, "done")
    finally:
        for proc in procs:
            _kill(proc)
    assert counter.read_text() == "80"


def test_atomic_dir_refuses_a_file_and_writes_nothing(tmp_path):
    from atm.errors import AtmError

    target = tmp_path / "ckpt"
    target.write_text("not a directory")
    with pytest.raises(AtmError, match=r"ckpt: exists and is not a directory$"):
        with atomic_dir(target):
            pass
    assert target.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
