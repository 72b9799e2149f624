"""Benchmark: the same 6-trial distillation sweep with the teacher-output cache off and on.

    python analysis/bench_teacher_cache.py [--workdir DIR] [--steps 300]

Trains the teacher chain once (tokenizer, Stage 1, Stage 2) in ``--workdir``, then runs
``sweeps/bench_teacher_cache.yaml`` twice -- ``distill.cache.enabled=false`` and ``=true`` (fresh cache) --
and prints each trial's wall time (from its MLflow run), the ratio of cached to uncached trials after the
first (the first cached trial fills the cache), and the cache size on disk. A script, not a timed test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _train(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "atm.train", *args], cwd=cwd, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _trial_seconds(cwd: Path, study: str) -> list[tuple[int, float, float]]:
    """(trial number, wall seconds, cache MB) of the sweep's nested runs, from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("atm")
    runs = client.search_runs([exp.experiment_id], f"tags.`atm.sweep` = '{study}' and attributes.status = 'FINISHED'"
                              " and tags.`atm.stage` = 'distill_final'", max_results=100)
    rows = [(int(r.data.tags["optuna.trial_number"]), (r.info.end_time - r.info.start_time) / 1000,
             r.data.metrics.get("cache/teacher0/size_mb", 0.0)) for r in runs]
    return sorted(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the MLflow store goes (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps per trial")
    args = parser.parse_args(argv)
    cwd = args.workdir or Path(tempfile.mkdtemp(prefix="atm-bench-cache-"))
    cwd.mkdir(parents=True, exist_ok=True)
    steps = f"trainer.max_steps={args.steps}"
    print(f"workdir {cwd}; training the teachers once ...", flush=True)
    print(f"  teachers: {_train(['stage=pretrain_stage2'], cwd):.0f} s", flush=True)
    shutil.rmtree(cwd / ".atm" / "teacher_cache", ignore_errors=True)
    results = {}
    for cached in (False, True):
        study = f"bench_cache_{'on' if cached else 'off'}"
        wall = _train(["-m", "+sweep=bench_teacher_cache", f"hydra.sweeper.study_name={study}",
                       f"distill.cache.enabled={str(cached).lower()}", steps], cwd)
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
