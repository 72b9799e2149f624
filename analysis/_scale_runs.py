"""The measured part of ``analysis/bench_scale.py``: real CPU runs of paper-scale presets, each its own process,
timed (wall seconds) and measured (peak resident set size of that process and the children it waited for,
``os.wait4``'s ``ru_maxrss``, KiB on Linux).

* :func:`cli_run`: ``python -m atm.train stage=pretrain_stage1 model=<preset> trainer.max_steps=2 ...``, the
  project's own entrypoint, with small data caps and an MLflow store of its own;
* :func:`zero3_command`: this file run as a script (``python analysis/_scale_runs.py zero3 ...``): one process
  (world size 1, gloo) builds a preset under ``deepspeed.zero.Init`` (ZeRO stage 3, parameters partitioned as
  they are created; transformers' own ZeRO-3 construction: ``no_init_weights``, then
  ``initialize_weights_zero3`` and ``tie_weights``) and, when asked, wraps it in ``deepspeed.initialize`` with
  AdamW; it prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Measured:
    """One child process: ``seconds`` of wall time, ``peak_rss`` bytes, exit ``status`` and its ``log`` file."""

    seconds: float
    peak_rss: int
    status: int
    log: Path


def measure(cmd: list[str], log: Path, env: dict[str, str], cwd: Path, ticker=None) -> Measured:
    """Run ``cmd`` with stdout and stderr into ``log``; wall time and peak RSS from ``os.wait4`` (of this child
    and the descendants it waited for). ``ticker(seconds)`` is called every 5 seconds while it runs."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        done = threading.Event()

        def tick():
            while not done.wait(5.0):
                ticker(time.perf_counter() - start)

        thread = threading.Thread(target=tick, daemon=True) if ticker else None
        if thread:
            thread.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        finally:
            done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Measured(time.perf_counter() - start, usage.ru_maxrss * 1024, proc.returncode, log)


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(text[-lines:])


def cli_env() -> dict[str, str]:
    """This environment, without a tracking server or launcher variables, with no progress bars."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), TQDM_DISABLE="1", HYDRA_FULL_ERROR="0")
    for key in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def cli_overrides(work: Path, vocab_size: int, lines: int) -> list[str]:
    """Overrides shared by the tokenizer run and every training run: the store, small data caps, CPU."""
    return [f"tracking.uri=sqlite:///{work / 'mlflow.db'}", f"tracking.cache_dir={work / 'cache'}",
            "tracking.system_metrics=false", "trainer.device=cpu",
            "lineage.inherit=[lineage,data,tokenizer,tracking,trainer.device]",
            f"tokenizer.vocab_size={vocab_size}", "tokenizer.max_lines_per_source=1000",
            f"data.written.max_lines_per_source={lines}", f"data.spoken.max_lines_per_source={lines}",
            "data.heldout.max_lines_per_lang=4", "eval.perplexity.max_lines_per_lang=4"]


def train_command(preset: str, precision: str, steps: int, batch: int, seq_len: int, shared: list[str]) -> list[str]:
    """``python -m atm.train stage=pretrain_stage1`` of ``preset``: ``steps`` steps of ``batch`` x ``seq_len``,
    ``precision`` fp32 or bf16 (autocast), no intermediate checkpoints or training states."""
    return [sys.executable, "-m", "atm.train", "stage=pretrain_stage1", f"model={preset}", *shared,
            f"trainer.max_steps={steps}", f"trainer.batch_size={batch}", f"data.max_seq_len={seq_len}",
            f"trainer.precision={precision}", "trainer.warmup_steps=1", "trainer.save_every=null",
            "trainer.state_every=null", "trainer.log_every=1", f"run_name=bench_scale-{preset}-{precision}"]


def run_metrics(work: Path, run_name: str) -> dict[str, float]:
    """The metrics of the newest run named ``run_name`` in ``work``'s store (empty when there is none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return dict(runs[0].data.metrics) if runs else {}


# ----------------------------------------------------------------------------------- ZeRO-3 child process


def _zero3_child(preset_name: str, vocab_size: int, precision: str, with_optimizer: bool) -> dict:
    import resource

    import deepspeed
    import torch

    # imported before zero.Init: inside it DeepSpeed replaces torch.Tensor.__new__, and importing the model's
    # module there (it imports torch._dynamo) fails on torch 2.13 ("Signature mismatch ... tensor_pynew")
    from transformers import RobertaPreLayerNormForMaskedLM  # noqa: F401
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import initialize_weights_zero3

    from analysis._scale import VocabOnly
    from atm.engine.deepspeed import init_distributed
    from atm.models.encoder import build_mlm, load_preset

    t0 = time.perf_counter()
    init_distributed()  # one process, no launcher: gloo on CPU
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "gradient_clipping": 1.0,
              "bf16": {"enabled": precision == "bf16"}, "zero_optimization": {"stage": 3},
              "steps_per_print": 2**31 - 1}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    t1 = time.perf_counter()
    # transformers' own ZeRO-3 path (PreTrainedModel._from_config): construct without initialising (Hugging Face's
    # _init_weights would index the empty local tensors of partitioned parameters), then initialise module by
    # module with its parameters gathered (initialize_weights_zero3), then tie the output to the input embedding
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=config, dtype=dtype):
        model = build_mlm(load_preset(preset_name), VocabOnly(vocab_size))
    t_built = time.perf_counter()
    initialize_weights_zero3(model)
    model.tie_weights()
    t2 = time.perf_counter()
    params = {id(p): p for p in model.parameters()}
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in params.values())
    local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params.values() if hasattr(p, "ds_tensor"))
    out = {"preset": preset_name, "precision": precision, "params": numel, "partition_bytes": local,
           "dist_seconds": t1 - t0, "construct_seconds": t_built - t1, "init_seconds": t2 - t1,
           "init_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if with_optimizer:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        out["initialize_seconds"] = time.perf_counter() - t2
        out["initialize_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def zero3_command(preset: str, vocab_size: int, precision: str, with_optimizer: bool) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "zero3", preset, str(vocab_size), precision,
            "1" if with_optimizer else "0"]


if __name__ == "__main__":
    if len(sys.argv) != 6 or sys.argv[1] != "zero3":
        print("usage: _scale_runs.py zero3 PRESET VOCAB_SIZE fp32|bf16 0|1 (run by analysis/bench_scale.py)",
              file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, str(REPO))
    result = _zero3_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
    print("ZERO3_RESULT " + json.dumps(result), flush=True)
