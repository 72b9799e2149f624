"""Benchmark: MLM training throughput of atm's loop against ``transformers.Trainer``, in one process.

    python analysis/bench_throughput.py [--model teacher_small] [--steps 20] [--warmup 3]
        [--batch-size 16] [--seq-len 128] [--repeats 2] [--precision auto] [--peak-tflops X] [--threads N]

Both sides train the same ``RobertaPreLayerNormForMaskedLM`` (an atm model preset, built by
``atm.models.encoder.build_mlm`` with the same seed), on the same data, batch size and sequence length,
with the same optimiser (torch AdamW, no decay on 1-D tensors, linear warm-up then linear decay, gradient
clipping at 1.0) and the same masking (``DataCollatorForLanguageModeling``: 15%, 80/10/10):

* atm: ``atm.engine.loop.fit`` with the pretraining loss of ``atm/stages/pretrain.py`` (LM head at the
  masked positions only, ``atm.models.encoder.mlm_forward``);
* Trainer: ``Trainer`` + ``TrainingArguments(optim="adamw_torch", report_to=[])``, the model's own
  forward (LM head at every position).

Data: written-form pretraining text (``atm.data.corpora.written_corpus``, needs ``ATM_DATA_MIRROR``),
tokenized with a SentencePiece vocabulary trained on it here, concatenated and cut into blocks of exactly
``--seq-len`` tokens, so no batch holds padding and every token counts (the same blocks, in the same
order of seeds, for both). The first ``--warmup`` steps of each run are not timed. The runs alternate
(atm, Trainer, Trainer, atm, ...) over ``--repeats`` rounds; tokens/s is the median per side. Tokens per
CPU second of this process are printed too: on a machine shared with other jobs they stay comparable
when wall time does not (with ``--threads 1`` they measure compute alone).

On CUDA it also prints model FLOPs utilisation, MFU = F * tokens/s / peak, with F the training FLOPs
per token of the encoder: 6 N (forward + backward, Kaplan et al. 2020, "Scaling Laws for Neural Language
Models", sec. 2.1, C ~ 6 N; N = non-embedding parameters) plus 12 L T d for the attention scores and
their weighted sum (Chowdhery et al. 2022, PaLM, appendix B: 6N + 12 L H Q T with H Q = d). The vocabulary
projection is left out (it is the tied embedding, outside N), so the figure is conservative for both
sides. Peak: dense bf16 tensor-core FLOP/s of the device (table ``PEAK_BF16_TFLOPS``, or
``--peak-tflops``). A script, not a timed test.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from atm.errors import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
#: Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched against
#: ``torch.cuda.get_device_name()`` in order (first substring that matches).
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),   # SXM4 and PCIe
    ("L40S", 362.0),
    ("A10G", 70.0),
    ("L4", 121.0),
)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s: ``override`` if given, else from :data:`PEAK_BF16_TFLOPS`."""
    if override:
        return override
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def train_flops_per_token(config, seq_len: int) -> float:
    """6 N + 12 L T d (Kaplan et al. 2020 sec. 2.1; PaLM appendix B), N = non-embedding parameters."""
    from atm.models.encoder import count_parameters

    n = count_parameters(config, non_embedding=True)
    return 6.0 * n + 12.0 * config.num_hidden_layers * seq_len * config.hidden_size


def blocks(tokenizer, lines: list[str], seq_len: int, n_blocks: int) -> list[dict[str, list[int]]]:
    """``n_blocks`` examples of exactly ``seq_len`` ids: ``<s>`` + a run of the concatenated lines + ``</s>``."""
    ids: list[int] = []
    for encoded in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        if len(ids) >= n_blocks * (seq_len - 2):
            break
    body = seq_len - 2
    if len(ids) < n_blocks * body:
        raise SystemExit(f"error: the text gives {len(ids) // body} blocks of {seq_len} tokens, {n_blocks} needed")
    return [{"input_ids": [tokenizer.bos_token_id, *ids[i * body:(i + 1) * body], tokenizer.eos_token_id]}
            for i in range(n_blocks)]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time and this process's CPU time from the end of step ``args.warmup`` to the end of the last
    step (CUDA synchronised). CPU time is what stays comparable on a machine shared with other jobs."""

    def __init__(self, args, device) -> None:
        self.args, self.device, self.marks = args, device, {}

    def at(self, step: int) -> None:
        if step in (self.args.warmup, self.args.warmup + self.args.steps):
            sync(self.device)
            self.marks[step] = (time.perf_counter(), time.process_time())

    def tokens_per_second(self) -> tuple[float, float]:
        """(tokens per wall second, tokens per CPU second of this process)."""
        a = self.args
        (wall0, cpu0), (wall1, cpu1) = self.marks[a.warmup], self.marks[a.warmup + a.steps]
        tokens = a.steps * a.batch_size * a.seq_len
        return tokens / (wall1 - wall0), tokens / max(cpu1 - cpu0, 1e-9)


def run_atm(model, examples, tokenizer, args, device) -> tuple[float, float]:
    """(tokens/s, tokens/CPU-s) of ``atm.engine.loop.fit`` after ``args.warmup`` untimed steps."""
    from omegaconf import OmegaConf

    from atm.data.collate import batch_stream, mlm_collator
    from atm.distill.losses import mlm_ce
    from atm.engine.loop import fit
    from atm.models.encoder import mlm_forward

    cfg = OmegaConf.create({"max_steps": args.steps + args.warmup, "batch_size": args.batch_size, "lr": args.lr,
                            "weight_decay": 0.01, "warmup_steps": args.warmup, "grad_clip": 1.0,
                            "precision": args.precision, "device": device.type, "log_every": 10**9,
                            "save_every": None})
    stream = batch_stream(examples, args.batch_size, mlm_collator(tokenizer), args.seed)

    def loss_fn(batch, step):  # the loss of atm/stages/pretrain.py
        masked = batch["labels"] != -100
        out = mlm_forward(model, batch["input_ids"], batch["attention_mask"], masked)
        return mlm_ce(out["logits"], batch["labels"][masked]), {}

    clock = Clock(args, device)
    fit(model, stream, loss_fn, cfg, callbacks=[clock.at], desc="atm", log_metrics=False)
    return clock.tokens_per_second()


def run_trainer(model, examples, tokenizer, args, device, out_dir: str) -> tuple[float, float]:
    """(tokens/s, tokens/CPU-s) of ``transformers.Trainer`` after ``args.warmup`` untimed steps."""
    from transformers import (
        DataCollatorForLanguageModeling,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    clock = Clock(args, device)

    class OnStep(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            clock.at(state.global_step)

    training = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, max_steps=args.steps + args.warmup,
        learning_rate=args.lr, weight_decay=0.01, warmup_steps=args.warmup, lr_scheduler_type="linear",
        max_grad_norm=1.0, optim="adamw_torch", bf16=args.precision == "bf16", use_cpu=device.type == "cpu",
        report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True, seed=args.seed,
        dataloader_num_workers=0)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
    trainer = Trainer(model=model, args=training, train_dataset=examples, data_collator=collator,
                      callbacks=[OnStep()])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return clock.tokens_per_second()


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="teacher_small", help="atm model preset (conf/model/<name>.yaml)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (also the LR warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, <s> and </s> included")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each runs both sides, order alternating")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--vocab-size", type=int, default=8000, help="SentencePiece vocabulary trained here")
    parser.add_argument("--lines-per-source", type=int, default=1500, help="written-corpus lines per source")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device bf16 peak (default: table)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    from atm.data import corpora
    from atm.models.encoder import (
        build_mlm,
        check_max_seq_len,
        count_parameters,
        load_preset,
    )
    from atm.models.tokenizer import train_tokenizer

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    preset = load_preset(args.model)

    lines = [line.text for line in corpora.written_corpus(args.lines_per_source, seed=args.seed)]
    with tempfile.TemporaryDirectory(prefix="atm-bench-throughput-") as tmp:
        tokenizer = train_tokenizer(lines, Path(tmp) / "tokenizer", args.vocab_size, seed=args.seed)
        n_blocks = (args.steps + args.warmup) * args.batch_size
        examples = blocks(tokenizer, lines, args.seq_len, n_blocks)

        def fresh_model():
            model = build_mlm(preset, tokenizer, seed=args.seed)
            check_max_seq_len(model, args.seq_len)
            return model.to(device)

        probe = fresh_model()
        n_params = count_parameters(probe)
        flops = train_flops_per_token(probe.config, args.seq_len)
        del probe
        where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"model {args.model}: {n_params / 1e6:.1f}M parameters "
              f"({count_parameters(preset, vocab_size=len(tokenizer), non_embedding=True) / 1e6:.1f}M non-embedding),"
              f" vocabulary {len(tokenizer)}; {where}, {args.precision}; batch {args.batch_size} x {args.seq_len} "
              f"tokens (fixed-length blocks, no padding); {args.steps} timed steps after {args.warmup}", flush=True)

        results: dict[str, list[tuple[float, float]]] = {"atm": [], "trainer": []}
        order = []
        for r in range(args.repeats):
            order += ["atm", "trainer"] if r % 2 == 0 else ["trainer", "atm"]
        for i, side in enumerate(order):
            torch.manual_seed(args.seed)
            model = fresh_model()
            if side == "atm":
                tps = run_atm(model, examples, tokenizer, args, device)
            else:
                tps = run_trainer(model, examples, tokenizer, args, device, os.path.join(tmp, f"trainer-{i}"))
            results[side].append(tps)
            print(f"  run {i + 1}/{len(order)} {side:8s} {tps[0]:10.0f} tokens/s {tps[1]:10.0f} tokens/CPU-s",
                  flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    wall = {side: statistics.median(v[0] for v in runs) for side, runs in results.items()}
    cpu = {side: statistics.median(v[1] for v in runs) for side, runs in results.items()}
    gpu = device.type == "cuda"
    peak = peak_tflops(where, args.peak_tflops) if gpu else None
    print("\n| loop | tokens/s (median) | tokens/s per run | tokens/CPU-s (median) |" + (" MFU |" if gpu else ""))
    print("|---|---|---|---|" + ("---|" if gpu else ""))
    for side, name in (("atm", "atm fit"), ("trainer", "transformers.Trainer")):
        row = (f"| {name} | {wall[side]:.0f} | {', '.join(f'{v[0]:.0f}' for v in results[side])} "
               f"| {cpu[side]:.0f} |")
        if gpu:
            row += f" {100 * flops * wall[side] / (peak * 1e12):.1f}% |" if peak else " (unknown peak) |"
        print(row)
    print(f"\nratio atm / Trainer: {wall['atm'] / wall['trainer']:.2f} (tokens/s), "
          f"{cpu['atm'] / cpu['trainer']:.2f} (tokens per CPU second)")
    if gpu:
        print(f"MFU: F = 6 N + 12 L T d = {flops / 1e9:.2f} GFLOP per token; peak "
              + (f"{peak:.0f} TFLOP/s bf16 ({where})" if peak else "unknown: pass --peak-tflops"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
