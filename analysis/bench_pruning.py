"""Benchmark: the same sweep with and without pruning -- total compute and best value of each.

    python analysis/bench_pruning.py [--workdir DIR] [--trials 10] [--steps 120] [--pruner median]

Trains the tokenizer once in ``--workdir`` (a temporary directory by default), then runs
``sweeps/bench_pruning.yaml`` (Stage-1 MLM pretraining of the tiny teacher over learning rate, warm-up and batch
size; objective: held-out written perplexity, reported every ``--every`` steps) twice with the same sampler
seed and the same number of trials: with ``hydra.sweeper.pruner.name=none`` (no intermediate evaluation
either) and with ``--pruner`` (evaluating every ``--every`` steps, which pruning pays for). For each it
prints, from the Optuna study: the trials finished and pruned, the total training steps (a pruned trial counts
the steps it ran, its last reported step), the total trial wall seconds, the sweep's wall seconds and the best
value; then the ratios pruned/unpruned. The random sampler draws the same parameters in both sweeps (it is
seeded by the trial number), so the unpruned sweep's best value is what pruning may lose. A script, not a timed
test (wall seconds depend on the machine's load; steps do not). Needs the data (``ATM_DATA_MIRROR``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atm.errors import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
# Smaller data and evaluation than the defaults, so that both sweeps fit in about 10 minutes on 2 CPU cores.
SMALL = ["data.written.max_lines_per_source=300", "data.max_seq_len=48", "eval.perplexity.max_lines_per_lang=8",
         "data.heldout.max_lines_per_lang=8", "tokenizer.max_lines_per_source=300", "tokenizer.vocab_size=4000",
         "cost.latency_runs=5"]


def _train(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "atm.train", *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: python -m atm.train {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def summarise(study, max_steps: int) -> dict[str, float]:
    """Trials finished/pruned, total trained steps, total trial seconds and the best value of ``study``."""
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    steps = sum(max_steps if t.state == TrialState.COMPLETE else (t.last_step or 0) for t in done)
    seconds = sum(t.duration.total_seconds() for t in done)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    return {"complete": len(complete), "pruned": len(done) - len(complete), "steps": steps, "seconds": seconds,
            "best": min(t.value for t in complete) if complete else float("nan"),
            "best_trial": min(complete, key=lambda t: t.value).number if complete else -1}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the stores go (default: a temp dir)")
    parser.add_argument("--trials", type=int, default=10, help="trials per sweep")
    parser.add_argument("--steps", type=int, default=120, help="training steps per (unpruned) trial")
    parser.add_argument("--every", type=int, default=20, help="report (and maybe prune) every N steps")
    parser.add_argument("--pruner", default="median", help="median | successive_halving | hyperband | ...")
    args = parser.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cwd = args.workdir or Path(tempfile.mkdtemp(prefix="atm-bench-pruning-"))
    cwd.mkdir(parents=True, exist_ok=True)
    print(f"workdir {cwd}; training the tokenizer once ...", flush=True)
    _train(["stage=train_tokenizer", *SMALL], cwd)
    rows = {}
    for pruner in ("none", args.pruner):
        study = f"bench_pruning_{pruner}"
        wall = _train(["-m", "+sweep=bench_pruning", *SMALL, f"hydra.sweeper.study_name={study}",
                       f"hydra.sweeper.n_trials={args.trials}", f"trainer.max_steps={args.steps}",
                       f"hydra.sweeper.pruner.name={pruner}",
                       f"hydra.sweeper.pruner.report_every={0 if pruner == 'none' else args.every}"],
                      cwd)
        rows[pruner] = {**summarise(optuna.load_study(study_name=study, storage=f"sqlite:///{cwd / 'optuna.db'}"),
                                    args.steps), "wall": wall}
        print(f"  pruner {pruner}: {wall:.0f} s", flush=True)
    print(f"\n{args.trials} trials x {args.steps} steps; {args.pruner}: report every {args.every} steps; "
          "sampler: random, seed 0\n")
    print("| pruner | complete | pruned | trained steps | trial seconds | sweep seconds | best perplexity (trial) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['complete']} | {r['pruned']} | {r['steps']} | {r['seconds']:.0f} | {r['wall']:.0f} | "
              f"{r['best']:.2f} (#{r['best_trial']}) |")
    base, pruned = rows["none"], rows[args.pruner]
    print(f"\n{args.pruner}/none: steps {pruned['steps'] / base['steps']:.2f}, trial seconds "
          f"{pruned['seconds'] / base['seconds']:.2f}, best value {pruned['best'] / base['best']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
