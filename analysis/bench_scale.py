"""Paper-scale presets without a GPU: parameter counts, memory per GPU, and real CPU runs of the large ones.

    python analysis/bench_scale.py [--presets a,b,...] [--vocab-size 32000] [--gpus 1] [--gpu-memory 80]
        [--reserve 2] [--batch-size 32] [--seq-len 128] [--precision bf16] [--zero 0,1,2,3]
    python analysis/bench_scale.py --train [--train-presets student_170m,teacher_700m] [--train-precisions
        fp32,bf16] [--train-steps 2] [--train-batch-size 4] [--train-seq-len 64] [--work DIR]
    python analysis/bench_scale.py --zero3-init [--zero3-preset teacher_2b] [--zero3-precision bf16]
        [--zero3-optimizer auto|yes|no]

Always (seconds, no data needed): every preset of ``conf/model`` (default: the paper's five, then the CPU
ones) is built by ``atm.models.encoder.build_mlm`` on PyTorch's ``meta`` device (shapes without storage) with a
vocabulary of ``--vocab-size`` pieces (default 32,000, the tokenizer of ``+experiment=alexatm_gpu``); the
first table gives its parameters (non-embedding, the paper's count, and total; the meta build agrees with the
analytic count of ``count_parameters``). The second gives the memory per GPU of AdamW training on ``--gpus``
GPUs under each ZeRO stage (``--zero``), micro-batch ``--batch-size`` x ``--seq-len`` in ``--precision``:
weights, gradients and optimizer states (Rajbhandari et al. 2020, ZeRO, sec. 3.1: 2Ψ + 2Ψ + 12Ψ in mixed
precision, 4Ψ + 4Ψ + 8Ψ in fp32), activations without and with activation checkpointing (Korthikanti et al.
2022, eq. 1: s b h (34 + 5 a s / h) bytes per layer in 16 bits), whether weights + gradients + optimizer +
activations + ``--reserve`` GiB (CUDA context, workspaces, fragmentation) fit ``--gpu-memory`` GiB (the model
states counted by the larger of the ZeRO paper's and DeepSpeed's estimates), the largest micro-batch that would,
and the fewest GPUs on which ZeRO-3 with activation checkpointing fits. The third compares the model states with DeepSpeed's own estimators
(``estimate_zero2/3_model_states_mem_needs``, no offload; they count 18 bytes per partitioned parameter, fp32
gradients included). Formulas and their sources: ``analysis/_scale.py``.

``--train`` (minutes; needs ``ATM_DATA_MIRROR``): trains a tokenizer, then runs ``python -m atm.train
stage=pretrain_stage1 model=<preset> trainer.max_steps=2 ...`` on the CPU for every preset and precision (bf16:
autocast), each a process of its own with small data caps and its own MLflow store in ``--work`` (default: a
temporary directory), and prints wall time, the 2 training steps' time (MLflow ``train/seconds``) and peak
RSS (``os.wait4``) beside the estimate of the same formulas (plain PyTorch keeps fp32 weights, gradients and
moments: 16 bytes per parameter in both precisions).

``--zero3-init``: one process (world size 1, gloo) builds ``--zero3-preset`` under ``deepspeed.zero.Init``
(ZeRO-3, parameters partitioned as they are created) and, with ``--zero3-optimizer yes`` (``auto``: only when
DeepSpeed's estimate of the model states fits the memory available now), wraps it in ``deepspeed.initialize``
with AdamW; prints its time and peak RSS. Nothing is asserted: the script prints tables and ratios.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from analysis._scale import (
    GIB,
    PAPER_PRESETS,
    activations,
    memory,
    meta_model,
    model_states,
    shape_of,
)
from atm.errors import ArgumentParser


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(n: float | None) -> str:
    return "–" if n is None else f"{n / GIB:.1f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def _csv_list(text: str, name: str, parser, allowed=None, convert=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        parser.error(f"{name} is empty")
    try:
        values = [convert(t) for t in items]
    except ValueError:
        parser.error(f"{name}={text}: not a comma-separated list of {convert.__name__}")
    bad = [v for v in values if allowed is not None and v not in allowed]
    if bad:
        parser.error(f"{name}: {', '.join(map(str, bad))} not among {', '.join(map(str, allowed))}")
    return values


def parse_args(argv: list[str] | None):
    from atm.models.encoder import list_presets

    presets = list_presets()
    default = [p for p in PAPER_PRESETS if p in presets] + [p for p in presets if p not in PAPER_PRESETS]
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(default), help="model presets, comma-separated")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary of the meta builds")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the ZeRO stages partition over")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--reserve", type=float, default=2.0, help="GiB per GPU the formulas leave out")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch per GPU (sequences)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--zero", default="0,1,2,3", help="ZeRO stages to tabulate")
    parser.add_argument("--train", action="store_true", help="2-step CPU CLI runs (minutes)")
    parser.add_argument("--train-presets", default="student_170m,teacher_700m")
    parser.add_argument("--train-precisions", default="fp32,bf16")
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=64)
    parser.add_argument("--train-vocab-size", type=int, default=8000, help="vocabulary of the tokenizer run")
    parser.add_argument("--lines", type=int, default=200, help="text lines per source of the CLI runs")
    parser.add_argument("--zero3-init", action="store_true", help="build a preset under deepspeed.zero.Init")
    parser.add_argument("--zero3-preset", default="teacher_2b")
    parser.add_argument("--zero3-precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--zero3-optimizer", choices=["auto", "yes", "no"], default="auto",
                        help="also deepspeed.initialize with AdamW (auto: when the estimate fits free memory)")
    parser.add_argument("--work", default=None, help="directory of the CLI runs' store and logs (default: temp)")
    args = parser.parse_args(argv)
    for name in ("vocab_size", "gpus", "batch_size", "seq_len", "train_steps", "train_batch_size",
                 "train_seq_len", "train_vocab_size", "lines"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.gpu_memory > 0 or args.reserve < 0 or args.reserve >= args.gpu_memory:
        parser.error(f"need --gpu-memory > 0 and 0 <= --reserve < --gpu-memory, got {args.gpu_memory}, {args.reserve}")
    args.presets = _csv_list(args.presets, "--presets", parser, presets)
    args.zero = _csv_list(args.zero, "--zero", parser, [0, 1, 2, 3], int)
    args.train_presets = _csv_list(args.train_presets, "--train-presets", parser, presets)
    args.train_precisions = _csv_list(args.train_precisions, "--train-precisions", parser, ["fp32", "bf16"])
    if args.zero3_preset not in presets:
        parser.error(f"--zero3-preset {args.zero3_preset}: not among {', '.join(presets)}")
    return args, parser


# ----------------------------------------------------------------------------------------------- estimates


def shapes(names: list[str], vocab_size: int, seq_len: int, parser) -> list:
    """(Shape, seconds of the meta build, whether it has the analytic count of ``count_parameters``) per preset;
    ``--seq-len`` checked against each one's positions."""
    from transformers import RobertaPreLayerNormForMaskedLM  # noqa: F401 - imported before the timed builds

    from atm.errors import AtmError
    from atm.models.encoder import check_max_seq_len, count_parameters, load_preset

    out = []
    for name in names:
        preset = load_preset(name)
        start = time.perf_counter()
        model = meta_model(preset, vocab_size)
        seconds = time.perf_counter() - start
        try:
            check_max_seq_len(model, seq_len)
        except AtmError as err:
            parser.error(f"--seq-len for {name}: {err}")
        shape = shape_of(name, model)
        out.append((shape, seconds, shape.params == count_parameters(preset, vocab_size=vocab_size)))
        del model
    return out


def print_estimates(args, built) -> None:
    print(f"## Parameters (vocabulary {args.vocab_size:,}; built on the meta device by build_mlm)\n")
    rows = [[s.name, f"{s.layers} x {s.hidden} ({s.heads} heads)", _count(s.non_embedding), _count(s.params),
             f"{100 * (s.params - s.non_embedding) / s.params:.0f}%", _count(s.largest_layer), f"{sec:.2f}",
             "yes" if same else "NO"] for s, sec, same in built]
    print(_table(["preset", "layers x hidden", "non-embedding", "total", "embedding share", "largest layer",
                  "meta build s", "= analytic count"], rows))

    gpu, reserve = args.gpu_memory * GIB, args.reserve * GIB
    print(f"\n## Memory per GPU (GiB): {args.gpus} GPU(s) of {args.gpu_memory:g} GiB, {args.precision}, "
          f"micro-batch {args.batch_size} x {args.seq_len}, AdamW; fits = total + {args.reserve:g} GiB reserve "
          f"<= {args.gpu_memory:g} GiB (states: the larger of paper and DeepSpeed)\n")
    rows, summary = [], []
    for s, _, _ in built:
        for stage in args.zero:
            m = memory(s, zero_stage=stage, gpus=args.gpus, precision=args.precision, batch=args.batch_size,
                       seq_len=args.seq_len, gpu_bytes=gpu, reserve_bytes=reserve)
            rows.append([s.name, stage, _gib(m.weights), _gib(m.gradients), _gib(m.optimizer), _gib(m.activations),
                         _gib(m.activations_ckpt), _gib(m.total), _gib(m.total_ckpt), _gib(m.deepspeed),
                         "yes" if m.fits else "no", "yes" if m.fits_ckpt else "no",
                         f"{m.max_batch} / {m.max_batch_ckpt}"])
        summary.append((s, memory(s, zero_stage=0, gpus=1, precision=args.precision, batch=args.batch_size,
                                  seq_len=args.seq_len, gpu_bytes=gpu, reserve_bytes=reserve)))
    print(_table(["preset", "ZeRO", "weights", "grads", "optimizer", "activations", "act. ckpt", "total",
                  "total ckpt", "DeepSpeed est. states", "fits", "fits ckpt", "max batch / ckpt"], rows))

    print(f"\n## One {args.gpu_memory:g} GiB GPU ({args.precision}, micro-batch {args.batch_size} x {args.seq_len})\n")
    rows = []
    for s, m in summary:
        verdict = "yes" if m.fits else "with activation checkpointing" if m.fits_ckpt else "no"
        need = _min_gpus(s, args, gpu, reserve)
        rows.append([s.name, _count(s.non_embedding), _gib(m.total), _gib(m.total_ckpt), verdict,
                     f"{m.max_batch} / {m.max_batch_ckpt}", need])
    print(_table(["preset", "non-embedding", "total GiB", "total ckpt GiB", "fits one GPU",
                  "max micro-batch / ckpt", "GPUs needed (ZeRO-3, ckpt)"], rows))
    print_deepspeed_check(args, built)


def _min_gpus(shape, args, gpu: float, reserve: float, limit: int = 4096) -> str:
    """Fewest GPUs on which ZeRO-3 with activation checkpointing fits the micro-batch (doubling search)."""
    n = 1
    while n <= limit:
        m = memory(shape, zero_stage=3, gpus=n, precision=args.precision, batch=args.batch_size,
                   seq_len=args.seq_len, gpu_bytes=gpu, reserve_bytes=reserve)
        if m.fits_ckpt:
            return str(n)
        n *= 2
    return f"> {limit}"


def print_deepspeed_check(args, built) -> None:
    from analysis._scale import deepspeed_estimator, deepspeed_model_states

    try:
        import deepspeed

        version = deepspeed.__version__
    except ImportError:
        version = None
    print(f"\n## Model states per GPU (GiB, {args.gpus} GPU(s)): ZeRO paper ({args.precision}) vs DeepSpeed's "
          f"estimator (no offload; {'DeepSpeed ' + version if version else 'DeepSpeed not installed: restated'})\n")
    rows, agree = [], True
    for s, _, _ in built:
        row = [s.name]
        for stage in (2, 3):
            ours = sum(model_states(s.params, args.precision, stage, args.gpus))
            restated = deepspeed_model_states(s.params, s.largest_layer, stage, args.gpus)
            real = deepspeed_estimator(s.params, s.largest_layer, stage, args.gpus) if version else restated
            agree &= real == restated
            row += [_gib(ours), _gib(real), f"{real / ours:.2f}"]
        rows.append(row)
    print(_table(["preset", "ZeRO-2 paper", "ZeRO-2 DeepSpeed", "ratio", "ZeRO-3 paper", "ZeRO-3 DeepSpeed",
                  "ratio"], rows))
    if version:
        print(f"\nDeepSpeed's estimator equals its restatement in analysis/_scale.py for every preset: "
              f"{'yes' if agree else 'NO'}")


# ----------------------------------------------------------------------------------------------- real runs


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, bar_format="{desc}: {n}/{total} [{elapsed}] {postfix}")


def run_train(args, work: Path) -> None:
    from analysis._scale import Shape
    from analysis._scale_runs import (
        cli_env,
        cli_overrides,
        measure,
        run_metrics,
        tail,
        train_command,
    )
    from atm.models.encoder import count_parameters, load_preset

    env, shared = cli_env(), cli_overrides(work, args.train_vocab_size, args.lines)
    plan = [(p, q) for p in args.train_presets for q in args.train_precisions]
    bar = _progress(len(plan) + 1, "bench_scale --train")
    bar.set_postfix_str("tokenizer")
    tok = measure([sys.executable, "-m", "atm.train", "stage=train_tokenizer", *shared], work / "tokenizer.log",
                  env, work, lambda t: bar.set_postfix_str(f"tokenizer {t:.0f}s", refresh=True))
    bar.update()
    if tok.status != 0:
        bar.close()
        sys.exit(f"error: the tokenizer run failed (exit {tok.status}), {tok.log}:\n{tail(tok.log)}")
    rows = []
    for preset, precision in plan:
        name = f"{preset} {precision}"
        cmd = train_command(preset, precision, args.train_steps, args.train_batch_size, args.train_seq_len, shared)
        result = measure(cmd, work / f"train-{preset}-{precision}.log", env, work,
                         lambda t, name=name: bar.set_postfix_str(f"{name} {t:.0f}s", refresh=True))
        bar.update()
        if result.status != 0:
            bar.write(f"{name}: exit {result.status}, {result.log}:\n{tail(result.log)}")
        metrics = run_metrics(work, f"bench_scale-{preset}-{precision}") if result.status == 0 else {}
        cfg = load_preset(preset)
        params = count_parameters(cfg, vocab_size=args.train_vocab_size)
        shape = Shape(preset, params, 0, 0, cfg["num_hidden_layers"], cfg["hidden_size"],
                      cfg["num_attention_heads"], args.train_vocab_size)
        states = sum(model_states(params, "fp32", 0, 1))  # plain PyTorch: fp32 weights, grads, moments
        estimate = states + activations(shape, args.train_seq_len, args.train_batch_size, precision)
        seconds = metrics.get("train/seconds")
        rows.append([preset, precision, _count(params), "ok" if result.status == 0 else f"exit {result.status}",
                     f"{result.seconds:.0f}", "–" if seconds is None else f"{seconds:.1f}",
                     "–" if seconds is None else f"{seconds / args.train_steps:.1f}", _gib(result.peak_rss),
                     _gib(states), _gib(estimate), f"{result.peak_rss / estimate:.2f}",
                     "–" if "train/loss" not in metrics else f"{metrics['train/loss']:.2f}"])
    bar.close()
    print(f"\n## CPU runs: python -m atm.train stage=pretrain_stage1 trainer.max_steps={args.train_steps}, batch "
          f"{args.train_batch_size} x {args.train_seq_len}, vocabulary {args.train_vocab_size:,} (tokenizer run "
          f"{tok.seconds:.0f} s); peak RSS of each process (GiB)\n")
    print(_table(["preset", "precision", "params", "status", "wall s", "train s", "s/step", "peak RSS",
                  "est. states (16 B/param)", "est. states + act.", "RSS / est.", "loss"], rows))
    print(f"\nlogs and store: {work}")


def run_zero3(args, work: Path) -> None:
    import json

    from analysis._scale import deepspeed_model_states
    from analysis._scale_runs import cli_env, measure, tail, zero3_command
    from atm.models.encoder import load_preset

    shape = shape_of(args.zero3_preset, meta_model(load_preset(args.zero3_preset), args.vocab_size))
    need = deepspeed_model_states(shape.params, shape.largest_layer, 3, 1)
    available = _mem_available()
    optimizer = args.zero3_optimizer == "yes" or (args.zero3_optimizer == "auto" and need < 0.8 * available)
    bar = _progress(1, "bench_scale --zero3-init")
    result = measure(zero3_command(args.zero3_preset, args.vocab_size, args.zero3_precision, optimizer),
                     work / f"zero3-{args.zero3_preset}.log", cli_env(), work,
                     lambda t: bar.set_postfix_str(f"{args.zero3_preset} {t:.0f}s", refresh=True))
    bar.update()
    bar.close()
    lines = [ln for ln in result.log.read_text(errors="replace").splitlines() if ln.startswith("ZERO3_RESULT ")]
    if result.status != 0 or not lines:
        sys.exit(f"error: the ZeRO-3 run failed (exit {result.status}), {result.log}:\n{tail(result.log)}")
    out = json.loads(lines[-1].split(" ", 1)[1])
    print(f"\n## ZeRO-3 on CPU, one process (gloo), {args.zero3_preset} in {args.zero3_precision}, vocabulary "
          f"{args.vocab_size:,}\n")
    construct, init = out["construct_seconds"], out["init_seconds"] - out["construct_seconds"]
    rows = [["deepspeed.zero.Init + build_mlm, initialize_weights_zero3", _count(out["params"]),
             _gib(out["partition_bytes"]), f"{out['init_seconds']:.1f} ({construct:.1f} + {init:.1f})",
             _gib(out["init_peak_rss"])]]
    if optimizer:
        rows.append(["+ deepspeed.initialize (AdamW)", "", "", f"{out['initialize_seconds']:.1f}",
                     _gib(out["initialize_peak_rss"])])
    print(_table(["step", "params", "rank-0 partition GiB", "seconds (construct + init)", "peak RSS GiB"], rows))
    print(f"\nprocess: {result.seconds:.0f} s wall (imports, gloo process group {out['dist_seconds']:.1f} s, build, "
          "exit), "
          f"peak RSS {_gib(result.peak_rss)} GiB")
    if not optimizer:
        print(f"deepspeed.initialize not run: DeepSpeed's estimate of the ZeRO-3 model states on one rank, "
              f"{_gib(need)} GiB, exceeds 80% of the {_gib(available)} GiB available now "
              "(--zero3-optimizer yes forces it)")


def _mem_available() -> float:
    """Bytes of ``MemAvailable`` in /proc/meminfo (Linux); infinity where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    built = shapes(args.presets, args.vocab_size, args.seq_len, parser)
    print_estimates(args, built)
    if args.train or args.zero3_init:
        with tempfile.TemporaryDirectory(prefix="atm-bench-scale-") as tmp:
            work = Path(args.work or tmp).resolve()
            work.mkdir(parents=True, exist_ok=True)
            if args.train:
                run_train(args, work)
            if args.zero3_init:
                run_zero3(args, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
