"""Many CLI commands in real processes, without paying the interpreter start each time.

A driver process imports once what every ``python -m atm.train`` would import again (the stage registry,
so every stage module: torch, transformers, MLflow; Hydra's override grammar and plugin scan), then forks one
child per command. The child changes to the command's working directory, points file descriptors 1 and 2 at
files and runs the command's module (``python -m <module>``) or script (``python <path>``) as ``__main__``
with the command's argv, exactly as the interpreter would after its start. The exit status is the child's:
``sys.exit(n)``, a raised exception (traceback on stderr, status 1), or a signal.

Used by ``tests/test_docs.py`` (every documented command composes) and ``tests/test_bad_inputs.py`` (the
bad-input battery); each of them also runs one command as a plain subprocess and compares.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

DRIVER = r"""
import json, os, runpy, sys, traceback
jobs_file, out_dir = sys.argv[1], sys.argv[2]
import atm.stages
atm.stages.all_stages()
import hydra._internal.utils, hydra._internal.hydra
from hydra.core.plugins import Plugins
Plugins.instance()
results = []
for i, job in enumerate(json.load(open(jobs_file))):
    log, out = os.path.join(out_dir, f"{i}.err"), os.path.join(out_dir, f"{i}.out")
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            if job["script"]:
                sys.argv = [job["script"], *job["argv"]]
                sys.path[0] = os.path.dirname(job["script"])
                runpy.run_path(job["script"], run_name="__main__")
            else:
                sys.argv = [job["module"], *job["argv"]]
                runpy.run_module(job["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    results.append({"returncode": os.waitstatus_to_exitcode(status), "stdout": open(out).read(),
                    "stderr": open(log).read()})
json.dump(results, open(os.path.join(out_dir, "results.json"), "w"))
"""


@dataclass
class Job:
    """One command: ``python -m <module> <argv>`` or, with ``script``, ``python <script> <argv>``, run in ``cwd``."""

    argv: list[str]
    cwd: str
    module: str = "atm.train"
    script: str | None = None

    def command(self) -> list[str]:
        """The plain command line this job stands for."""
        head = [self.script] if self.script else ["-m", self.module]
        return [sys.executable, *head, *self.argv]


def run_forked(jobs: list[Job], out_dir: Path, env: dict[str, str], timeout: float = 900
               ) -> list[subprocess.CompletedProcess]:
    """Run ``jobs`` one after the other in forked children of one driver (see the module docstring).

    Returns:
        one ``CompletedProcess`` per job (``args`` is its plain command line; ``returncode``, ``stdout``,
        ``stderr`` as a plain subprocess would give them).

    Raises:
        AssertionError: the driver itself failed (its stderr attached).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs_file = out_dir / "jobs.json"
    jobs_file.write_text(json.dumps([asdict(j) for j in jobs]))
    driver = subprocess.run([sys.executable, "-c", DRIVER, str(jobs_file), str(out_dir)], cwd=out_dir, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = json.loads((out_dir / "results.json").read_text())
    return [subprocess.CompletedProcess(j.command(), r["returncode"], r["stdout"], r["stderr"])
            for j, r in zip(jobs, results)]


def run_plain(job: Job, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """The same job as a plain subprocess (to check that forking changes nothing)."""
    return subprocess.run(job.command(), cwd=job.cwd, env=env, capture_output=True, text=True, timeout=timeout)


def split(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` interleaved slices (for several drivers side by side)."""
    return [items[i::parts] for i in range(parts)]


__all__ = ["Job", "run_forked", "run_plain", "split"]
