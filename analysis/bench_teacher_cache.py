"""Benchmark: the same 6-trial distillation sweep with the teacher-output cache off and on.

    python analysis/bench_teacher_cache.py [--workdir DIR] [--steps 300]

Trains a teacher once in ``--workdir`` (the tokenizer and a short Stage-1 run of the ``teacher_small``
preset, 6 x 256: its quality does not matter here, its cost does), then runs
``sweeps/bench_teacher_cache.yaml`` over it twice -- ``distill.cache.enabled=false`` and ``=true`` (fresh
cache) -- and prints each trial's wall time (from its MLflow run), the FLOPs ratio of teacher and student,
the ratio of cached to uncached trials after the first (the first cached trial fills the cache), and the
cache size on disk. A script, not a timed test. Needs the data (``ATM_DATA_MIRROR``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from analysis._store import RunIndex, local_store_uri
from atm.errors import ArgumentParser
from atm.tracking import TAG_SWEEP, TAG_TRIAL

REPO = Path(__file__).resolve().parents[1]


def _train(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "atm.train", *args], cwd=cwd, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _index(cwd: Path) -> RunIndex:
    """The runs of atm's default experiment in the store ``python -m atm.train`` wrote in ``cwd``."""
    return RunIndex.at(local_store_uri(cwd))


def _trial_seconds(cwd: Path, study: str) -> list[tuple[int, float, float]]:
    """(trial number, wall seconds, cache MB) of the sweep's nested runs, from MLflow."""
    runs = [r for r in _index(cwd).of_stage("distill_final") if r.data.tags.get(TAG_SWEEP) == study]
    rows = [(int(r.data.tags[TAG_TRIAL]), (r.info.end_time - r.info.start_time) / 1000,
             r.data.metrics.get("cache/teacher0/size_mb", 0.0)) for r in runs]
    return sorted(rows)


def _teacher_run(cwd: Path) -> str:
    """The newest Stage-1 run's id."""
    return _index(cwd).of_stage("pretrain_stage1", finished_only=False)[-1].info.run_id


def _flops_ratio() -> float:
    """Forward FLOPs per token of the encoders (2 x non-embedding parameters), teacher over student."""
    from atm.models.encoder import count_parameters, load_preset

    counts = [count_parameters(load_preset(name), vocab_size=1, non_embedding=True)
              for name in ("teacher_small", "student_tiny")]
    return counts[0] / counts[1]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the MLflow store goes (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps per trial")
    args = parser.parse_args(argv)
    cwd = args.workdir or Path(tempfile.mkdtemp(prefix="atm-bench-cache-"))
    cwd.mkdir(parents=True, exist_ok=True)
    steps = f"trainer.max_steps={args.steps}"
    print(f"workdir {cwd}; training the teacher once ...", flush=True)
    seconds = _train(["stage=pretrain_stage1", "model=teacher_small", "trainer.max_steps=100",
                      "trainer.save_every=null"], cwd)
    teacher_id = _teacher_run(cwd)
    print(f"  teacher {teacher_id}: {seconds:.0f} s; FLOPs per token (encoder, 2 x parameters): "
          f"teacher / student = {_flops_ratio():.0f}x", flush=True)
    shutil.rmtree(cwd / ".atm" / "teacher_cache", ignore_errors=True)
    results = {}
    for cached in (False, True):
        study = f"bench_cache_{'on' if cached else 'off'}"
        wall = _train(["-m", "+sweep=bench_teacher_cache", f"hydra.sweeper.study_name={study}",
                       f"teacher=runs:/{teacher_id}", f"distill.cache.enabled={str(cached).lower()}", steps], cwd)
        results[cached] = _trial_seconds(cwd, study)
        print(f"  sweep with cache {'on ' if cached else 'off'}: {wall:.0f} s", flush=True)
    off, on = results[False], results[True]
    print("\n| trial | cache off (s) | cache on (s) |\n|---:|---:|---:|")
    for (n, t_off, _), (_, t_on, _) in zip(off, on):
        print(f"| {n} | {t_off:.1f} | {t_on:.1f} |")
    later_off = [t for n, t, _ in off if n > 0]
    later_on = [t for n, t, _ in on if n > 0]
    ratio = (sum(later_on) / len(later_on)) / (sum(later_off) / len(later_off))
    print(f"\nfirst trial (fills the cache): off {off[0][1]:.1f} s, on {on[0][1]:.1f} s")
    print(f"trials 2-{len(on)}: mean {sum(later_off) / len(later_off):.1f} s uncached, "
          f"{sum(later_on) / len(later_on):.1f} s cached; ratio cached/uncached = {ratio:.2f}")
    size = sum(p.stat().st_size for p in (cwd / ".atm" / "teacher_cache").rglob("*.npy"))
    print(f"cache size on disk: {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
