"""MLM pretraining at a fixed CPU wall-clock budget: held-out MLM loss and tokens/s, per recipe or model shape.

Trains a model preset with atm's own loop (:func:`atm.engine.loop.fit`) on the real Stage-1 written corpus
(``--corpus spoken``: Stage-2 text) for ``--minutes`` of wall time on this CPU, then prints the held-out MLM
loss (mean cross-entropy in nats over 15% seeded-masked tokens, :func:`atm.stages.evaluate.mlm_perplexity`)
on UD dev sentences (``heldout_written``; spoken: MASSIVE dev, ``heldout_spoken``) and the training throughput
in real (non-padding) tokens per second.

``--compare`` runs the recipes of :data:`VARIANTS`: ``baseline`` (the settings before the budget recipe:
lines tokenized batch by batch, one padded example per line, dropout 0.1, linear schedule, fp32), then each
change on top of the previous ones (Cramming, Geiping & Goldstein 2022; Izsak et al. 2021) up to the
one-cycle schedule, and bf16 autocast and ``torch.compile`` each on top of that, and prints a table with
ratios against the baseline. ``--shapes`` compares model shapes (presets or ``HxLxF``) under the
full recipe. Variants run in one process, interleaved in turns of ``--slice-seconds`` of their own time
(one trains while the others wait), so that the load of a shared machine falls on all of them alike; each is
charged only its own time. The step count that fills the budget (the schedule decays to 0 there) is
estimated from a short calibration run per variant, which also measures ``torch.compile``'s up-front cost;
a variant still training when its budget is spent stops there (:class:`atm.engine.loop.StopTraining`).

    python analysis/bench_budget.py --minutes 2                         # the budget recipe, one preset
    python analysis/bench_budget.py --compare --minutes 3               # baseline -> each change, cumulatively
    python analysis/bench_budget.py --compare --variants baseline,bf16 --preset teacher_small --minutes 1
    python analysis/bench_budget.py --shapes teacher_tiny,teacher_tiny_m,192x4x768 --minutes 3

Writes ``<out>/bench_budget.{md,csv}``. Needs the real data (``ATM_DATA_MIRROR``); trains a tokenizer
(SentencePiece, ``conf/tokenizer/default.yaml`` settings) into ``--work`` the first time.
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars from fit

import csv
import math
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from atm.errors import ArgumentParser

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    """One training recipe. ``tokenize``: ``batch`` (each batch's lines, as before) or ``once``."""

    name: str
    tokenize: str = "batch"
    packing: bool = False
    dropout: float | None = None  # None: the preset's (0.1)
    schedule: str = "linear"
    precision: str = "fp32"
    compile: bool = False
    preset: str | None = None  # None: --preset


#: baseline, then each change on top of the previous ones up to ``one_cycle``; ``bf16`` and ``compile`` each
#: on top of ``one_cycle`` (hardware choices, measured one at a time).
VARIANTS: list[Variant] = []
for _name, _change in [("baseline", {}), ("tokenize_once", {"tokenize": "once"}), ("packing", {"packing": True}),
                       ("no_dropout", {"dropout": 0.0}), ("one_cycle", {"schedule": "one_cycle"})]:
    VARIANTS.append(replace(VARIANTS[-1] if VARIANTS else Variant("baseline"), name=_name, **_change))
VARIANTS += [replace(VARIANTS[-1], name="bf16", precision="bf16"), replace(VARIANTS[-1], name="compile", compile=True)]


class Turns:
    """Round-robin turns between variant threads: exactly one holds the turn and trains."""

    def __init__(self, names: list[str]):
        self.cond, self.order, self.current = threading.Condition(), list(names), names[0]

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)

    def pass_on(self, name: str, done: bool = False) -> None:
        with self.cond:
            i = self.order.index(name)
            if done:
                self.order.remove(name)
                self.current = self.order[i % len(self.order)] if self.order else None
            else:
                self.current = self.order[(i + 1) % len(self.order)]
            self.cond.notify_all()


@dataclass
class Clock:
    """A variant's own time: the sum of the periods it held the turn."""

    spent: float = 0.0
    since: float | None = None

    def start(self) -> None:
        self.since = time.perf_counter()

    def stop(self) -> None:
        self.spent, self.since = self.elapsed(), None

    def elapsed(self) -> float:
        return self.spent + (time.perf_counter() - self.since if self.since is not None else 0.0)


@dataclass
class Result:
    variant: Variant
    planned_steps: int = 0
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    masked: int = 0
    overhead: float = 0.0
    step_time: float = 0.0
    loss: float = math.nan
    extra: dict = field(default_factory=dict)


def preset_config(spec: str) -> dict:
    """A model preset by name (``conf/model/<name>.yaml``) or an ad-hoc ``HxLxF`` shape (heads = H / 64)."""
    from atm.models.encoder import load_preset

    if "x" in spec and spec.replace("x", "").isdigit():
        hidden, layers, ffn = (int(v) for v in spec.split("x"))
        return {"name": spec, "hidden_size": hidden, "num_hidden_layers": layers,
                "num_attention_heads": max(1, hidden // 64), "intermediate_size": ffn,
                "max_position_embeddings": 258, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                "hidden_act": "gelu", "layer_norm_eps": 1e-5}
    return load_preset(spec)


class Bench:
    """Shared data (corpus text, its tokens, held-out lines) and one variant's training."""

    def __init__(self, args, tokenizer):
        from atm.data import corpora
        from atm.data.shards import tokenize_corpus

        self.args, self.tokenizer = args, tokenizer
        corpus_fn = corpora.written_corpus if args.corpus == "written" else corpora.spoken_corpus
        t = time.perf_counter()
        self.lines = [line.text for line in corpus_fn(args.max_lines_per_source, seed=0)]
        self.prepare_seconds = time.perf_counter() - t
        t = time.perf_counter()
        self.corpus = tokenize_corpus(tokenizer, self.lines, desc=None)
        self.tokenize_seconds = time.perf_counter() - t
        heldout_fn = corpora.heldout_written if args.corpus == "written" else corpora.heldout_spoken
        self.heldout = [line.text for line in heldout_fn(args.heldout_lines)]

    def trainer_cfg(self, v: Variant, max_steps: int):
        a = self.args
        return OmegaConf.create({"max_steps": max_steps, "batch_size": a.batch_size, "lr": a.lr, "weight_decay": 0.01,
                                 "warmup_steps": a.warmup_steps, "schedule": v.schedule, "peak_fraction": 0.5,
                                 "grad_clip": 1.0, "precision": v.precision, "compile": v.compile,
                                 "log_every": 10**9, "grad_accum_steps": 1, "backend": "torch"})

    def stream(self, v: Variant):
        from atm.data.collate import batch_stream, mlm_collator, mlm_examples, text_mlm_collator

        if v.tokenize == "batch":
            collate = text_mlm_collator(self.tokenizer, self.args.max_seq_len, 0.15)
            return batch_stream(self.lines, self.args.batch_size, collate, 0)
        examples = mlm_examples(self.corpus, self.tokenizer, self.args.max_seq_len, v.packing)
        return batch_stream(examples, self.args.batch_size, mlm_collator(self.tokenizer, 0.15), 0)

    def train(self, v: Variant, max_steps: int, on_step, result: Result | None = None):
        """Train a fresh (seed 0) model of ``v`` for at most ``max_steps``; ``on_step(step)`` after each."""
        from atm.distill.losses import mlm_ce
        from atm.engine.loop import fit
        from atm.models.encoder import build_mlm, mlm_forward, training_dropout

        torch.manual_seed(0)
        model = build_mlm(preset_config(v.preset or self.args.preset), self.tokenizer,
                          max_seq_len=self.args.max_seq_len, seed=0)

        def loss_fn(batch, step):
            masked = batch["labels"] != -100
            if result is not None:
                result.tokens += int(batch["attention_mask"].sum())
                result.masked += int(masked.sum())
            out = mlm_forward(model, batch["input_ids"], batch["attention_mask"], masked)
            return mlm_ce(out["logits"], batch["labels"][masked]), {}

        with training_dropout(model, v.dropout):
            fit(model, self.stream(v), loss_fn, self.trainer_cfg(v, max_steps), callbacks=[on_step],
                log_metrics=False, desc=v.name)
        return model

    def calibrate(self, v: Variant, steps: int) -> tuple[float, float]:
        """(seconds per step, up-front seconds beyond that: compilation, first batches) of ``v``."""
        stamps = [time.perf_counter()]
        self.train(v, steps, lambda step: stamps.append(time.perf_counter()))
        durations = [b - a for a, b in zip(stamps, stamps[1:])]
        per_step = statistics.median(durations[2:] if len(durations) > 4 else durations)
        return per_step, max(0.0, sum(durations[:2]) - 2 * per_step)

    def heldout_loss(self, model) -> float:
        from atm.probes.perplexity import mlm_perplexity

        model.eval()
        return math.log(mlm_perplexity(model, self.tokenizer, self.heldout, self.args.max_seq_len))


def run_interleaved(bench: Bench, variants: list[Variant], budget: float, slice_s: float) -> list[Result]:
    """Train every variant for ``budget`` seconds of its own time, in round-robin turns."""
    from atm.engine.loop import StopTraining

    results = {v.name: Result(v) for v in variants}
    for v in variants:
        per_step, overhead = bench.calibrate(v, bench.args.calibration_steps)
        r = results[v.name]
        r.step_time, r.overhead = per_step, overhead
        r.planned_steps = max(10, int((budget - overhead) / per_step))
        print(f"calibrated {v.name}: {per_step * 1000:.0f} ms/step, {overhead:.1f} s up front -> "
              f"{r.planned_steps} steps", flush=True)
    turns, errors = Turns([v.name for v in variants]), []

    def worker(v: Variant) -> None:
        r, clock = results[v.name], Clock()
        turns.wait(v.name)
        try:
            clock.start()
            turn_start = [clock.elapsed()]

            def on_step(step: int) -> None:
                r.steps = step
                if clock.elapsed() >= budget:
                    raise StopTraining
                if clock.elapsed() - turn_start[0] >= slice_s:
                    clock.stop()
                    turns.pass_on(v.name)
                    turns.wait(v.name)
                    clock.start()
                    turn_start[0] = clock.elapsed()

            model = bench.train(v, r.planned_steps, on_step, r)
            clock.stop()
            r.seconds = clock.spent
            r.loss = bench.heldout_loss(model)
            print(f"done {v.name}: {r.steps} steps in {r.seconds:.0f} s, held-out loss {r.loss:.4f}", flush=True)
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        finally:
            turns.pass_on(v.name, done=True)

    threads = [threading.Thread(target=worker, args=(v,), name=v.name) for v in variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [results[v.name] for v in variants]


def table(results: list[Result]) -> list[dict]:
    base = results[0]
    rows = []
    for r in results:
        tps, base_tps = r.tokens / max(r.seconds, 1e-9), base.tokens / max(base.seconds, 1e-9)
        rows.append({"variant": r.variant.name, "preset": r.variant.preset or "", "steps": r.steps,
                     "planned_steps": r.planned_steps, "train_s": round(r.seconds, 1),
                     "ms_per_step": round(r.step_time * 1000, 1), "upfront_s": round(r.overhead, 1),
                     "tokens_per_s": round(tps), "masked_per_s": round(r.masked / max(r.seconds, 1e-9)),
                     "heldout_mlm_loss": round(r.loss, 4), "tokens_per_s_ratio": round(tps / base_tps, 3),
                     "loss_delta": round(r.loss - base.loss, 4),
                     "perplexity_ratio": round(math.exp(r.loss - base.loss), 3)})
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def tokenizer_for(work: Path):
    from atm.data import corpora
    from atm.models.tokenizer import load_tokenizer, train_tokenizer

    path = work / "tokenizer"
    if path.is_dir():
        return load_tokenizer(path)
    cfg = OmegaConf.load(REPO / "conf" / "tokenizer" / "default.yaml")
    cap = cfg.max_lines_per_source
    lines = corpora.written_corpus(cap) + corpora.spoken_corpus(cap)
    return train_tokenizer((line.text for line in lines), path, cfg.vocab_size,
                           character_coverage=cfg.character_coverage)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="teacher_tiny", help="model preset (conf/model) or HxLxF")
    p.add_argument("--minutes", type=float, default=10.0, help="wall budget per variant")
    p.add_argument("--compare", action="store_true", help="baseline, then each change cumulatively")
    p.add_argument("--variants", default=None, help="comma-separated names of VARIANTS (with --compare)")
    p.add_argument("--shapes", default=None, help="comma-separated presets / HxLxF, trained with the full recipe")
    p.add_argument("--recipe", default="one_cycle", help="the VARIANTS entry used alone or for --shapes")
    p.add_argument("--corpus", choices=("written", "spoken"), default="written")
    p.add_argument("--max-lines-per-source", type=int, default=None, help="corpus cap (default: all)")
    p.add_argument("--heldout-lines", type=int, default=300, help="held-out lines per language")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--slice-seconds", type=float, default=15.0, help="length of one interleaved turn")
    p.add_argument("--calibration-steps", type=int, default=12)
    p.add_argument("--work", type=Path, default=REPO / ".atm" / "bench_budget")
    p.add_argument("--out", type=Path, default=REPO / "analysis" / "out" / "bench_budget")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    by_name = {v.name: v for v in VARIANTS}
    if args.shapes:
        variants = [replace(by_name[args.recipe], name=s, preset=s) for s in args.shapes.split(",")]
    elif args.compare:
        names = args.variants.split(",") if args.variants else list(by_name)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            p.error(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(by_name)})")
        variants = [by_name[n] for n in names]
    else:
        variants = [by_name[args.recipe]]
    args.work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    tokenizer = tokenizer_for(args.work)
    bench = Bench(args, tokenizer)
    print(f"{args.corpus} corpus: {bench.corpus.n_lines} lines, {bench.corpus.n_tokens} tokens "
          f"(read and filtered in {bench.prepare_seconds:.1f} s, tokenized once in {bench.tokenize_seconds:.1f} s); "
          f"held-out: {len(bench.heldout)} lines; setup {time.perf_counter() - t:.0f} s; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    results = run_interleaved(bench, variants, args.minutes * 60, args.slice_seconds)
    rows = table(results)
    text = markdown(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_budget.md").write_text(text + "\n")
    with open(args.out / "bench_budget.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
