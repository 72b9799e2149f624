"""Benchmark: a user corpus 100x larger costs no more memory; tokenizing and loading are never the bottleneck.

    python analysis/bench_corpus.py [--small-tokens 1000000] [--factor 100] [--model teacher_small]
        [--steps 20] [--batch-size 16] [--seq-len 128] [--workdir DIR] [--keep]

Needs the data mirror (``ATM_DATA_MIRROR``): the corpora are real written-form text (the built-in Stage-1 lines,
:func:`atm.data.corpora.written_corpus`) drawn at random with replacement into two plain-text files of about
``--small-tokens`` and ``--factor`` times as many sub-tokens (as counted by the benchmark's tokenizer, a
SentencePiece vocabulary of 8,000 pieces trained here on 20,000 of the lines). Then:

1. **Tokenizing throughput**: :func:`atm.data.shards.write_shard` of the first tenth of the large file (at least
   the small one) in this process and in 2 worker processes, sub-tokens per second (decontamination included).
2. **Peak memory of a run**: ``python -m atm.train stage=pretrain_stage1 data.written.paths=[<file>]
   tokenizer_run=<the tokenizer> model=<--model>`` for ``--steps`` steps, on each corpus, twice: cold (the run
   tokenizes its corpus into a shard, in ``data.shards.workers=2`` processes) and warm (the shard is reused). The
   peak resident memory of the training process, and of it and its children together, sampled every 50 ms
   (psutil); the ratio large/small must stay <= 1.2.
3. **Loader against training**: tokens per second that :class:`atm.data.collate.BatchStream` delivers from the
   large shard (packed ``--seq-len`` blocks, MLM-masked batches of ``--batch-size``, in this process), against
   the tokens per second the warm large run trained (``train/samples_per_second`` x ``--seq-len``); the ratio
   must be >= 20 for data never to be the bottleneck.

A script, not a timed test: it prints the numbers and their ratios. Runs share the machine with whatever else
runs on it; memory ratios are robust to that, throughput less so (the loader and training are measured one after
the other on the same machine).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from atm.errors import ArgumentParser

REPO = Path(__file__).resolve().parents[1]
RSS_LIMIT, LOADER_RATIO = 1.2, 20.0


def make_corpus(lines: list[str], counts: list[int], tokens: int, path: Path, seed: int) -> tuple[int, int]:
    """Write lines drawn with replacement from ``lines`` (``counts``: their sub-tokens) to ``path`` until about
    ``tokens`` sub-tokens; returns the sub-tokens and lines written."""
    rng, total, n = random.Random(seed), 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while total < tokens:
            batch = rng.choices(range(len(lines)), k=min(10_000, max(1, (tokens - total) // 40)))
            fh.write("".join(lines[i] + "\n" for i in batch))
            total, n = total + sum(counts[i] for i in batch), n + len(batch)
    return total, n


class PeakRss:
    """Samples a process's resident memory, and its and its children's together, every ``interval`` s."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.process, self.interval = psutil.Process(pid), interval
        self.own = self.tree = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                own = self.process.memory_info().rss
                tree = own
                for child in self.process.children(recursive=True):
                    try:
                        tree += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.own, self.tree = max(self.own, own), max(self.tree, tree)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def train_run(corpus: Path, tokenizer_dir: Path, work: Path, args, env: dict[str, str]) -> dict[str, float]:
    """One ``pretrain_stage1`` run on ``corpus``: wall seconds, peak RSS (GiB) and training tokens/s."""
    command = [sys.executable, "-m", "atm.train", "stage=pretrain_stage1", f"model={args.model}",
               f"tokenizer_run={tokenizer_dir}", f"data.written.paths=[{corpus}]", "data.shards.workers=2",
               f"data.max_seq_len={args.seq_len}", f"trainer.batch_size={args.batch_size}",
               f"trainer.max_steps={args.steps}", f"trainer.log_every={args.steps}",
               "trainer.warmup_steps=1", "data.heldout.max_lines_per_lang=8", "eval.perplexity.max_lines_per_lang=8",
               f"tracking.uri=sqlite:///{work}/mlflow.db", "tracking.system_metrics=false",
               "lineage.train_missing=false"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = PeakRss(process.pid)
    out, err = process.communicate()
    peak.stop()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"error: the run on {corpus.name} failed (exit {process.returncode}): "
                         f"{(err.strip().splitlines() or ['?'])[-1]}")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work}/mlflow.db")
    run = client.search_runs(["1"], order_by=["attributes.start_time DESC"], max_results=1)[0]
    metrics = run.data.metrics
    return {"seconds": seconds, "own_gib": peak.own / 2**30, "tree_gib": peak.tree / 2**30,
            "train_tokens_per_s": metrics["train/samples_per_second"] * args.seq_len,
            "corpus_tokens": metrics["data/train_tokens"]}


def tokenizing(path: Path, n_lines: int, tokenizer, work: Path) -> None:
    """Part 1: tokens/s of :func:`atm.data.shards.write_shard` on the first ``n_lines`` of ``path``, in this
    process and in 2 worker processes."""
    from atm.data.shards import TextSource, write_shard

    with open(path, encoding="utf-8") as fh:
        sample = [line.rstrip("\n") for _, line in zip(range(n_lines), fh)]
    print(f"\n1. tokenizing {len(sample):,} lines into a shard (decontaminated):")
    rates = {}
    for workers in (1, 2):
        out = Path(tempfile.mkdtemp(dir=work))
        started = time.perf_counter()
        meta = write_shard([TextSource("sample", sample)], tokenizer, out, decontaminate=True, workers=workers)
        seconds = time.perf_counter() - started
        rates[workers] = meta["tokens"] / seconds
        print(f"   {'in this process' if workers == 1 else f'{workers} worker processes'}: {meta['tokens']:,} tokens "
              f"in {seconds:.1f} s = {rates[workers]:,.0f} tokens/s")
        shutil.rmtree(out)
    print(f"   2 workers / this process: {rates[2] / rates[1]:.2f}x")


def memory(files: dict[str, Path], tokenizer_dir: Path, work: Path, args, env: dict[str, str]) -> float:
    """Part 2: peak RSS of cold and warm runs on both corpora and their ratios; returns the warm large run's
    training tokens/s."""
    print(f"\n2. pretrain_stage1 ({args.model}, {args.steps} steps, batch {args.batch_size} x {args.seq_len}):")
    results = {}
    for state in ("cold", "warm"):
        for name in ("small", "large"):
            results[state, name] = r = train_run(files[name], tokenizer_dir, work, args, env)
            print(f"   {state} {name}: {r['corpus_tokens']:,.0f} tokens, {r['seconds']:.0f} s, peak RSS "
                  f"{r['own_gib']:.2f} GiB (with children {r['tree_gib']:.2f} GiB), trains "
                  f"{r['train_tokens_per_s']:,.0f} tokens/s")
    corpus_ratio = results["warm", "large"]["corpus_tokens"] / results["warm", "small"]["corpus_tokens"]
    print(f"   corpus ratio large/small: {corpus_ratio:.1f}x")
    for state in ("cold", "warm"):
        for key, label in (("own_gib", "training process"), ("tree_gib", "with children")):
            ratio = results[state, "large"][key] / results[state, "small"][key]
            verdict = "ok" if ratio <= RSS_LIMIT else f"OVER {RSS_LIMIT}x"
            print(f"   peak RSS ratio large/small, {state}, {label}: {ratio:.3f}x ({verdict})")
    return results["warm", "large"]["train_tokens_per_s"]


def loader(path: Path, tokenizer, work: Path, args, train_rate: float) -> None:
    """Part 3: tokens/s of MLM batches from the large corpus's shard against ``train_rate``."""
    from atm.data.collate import BatchStream, PackedBlocks, mlm_collator
    from atm.data.shards import build_shard
    from atm.data.sources import FileSource

    shard = build_shard([FileSource(str(path), (str(path),))], tokenizer, work / "data" / "shards",
                        decontaminate=True, workers=2)
    blocks = PackedBlocks(shard, args.seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    stream = BatchStream(blocks, args.batch_size, mlm_collator(tokenizer, 0.15), seed=0)
    n = 300
    next(stream)
    started = time.perf_counter()
    for _ in range(n):
        next(stream)
    rate = n * args.batch_size * args.seq_len / (time.perf_counter() - started)
    ratio = rate / train_rate
    print(f"\n3. loader: {rate:,.0f} tokens/s from the large shard ({len(blocks):,} blocks, in this process); "
          f"{args.model} trains {train_rate:,.0f} tokens/s: loader/training = {ratio:,.0f}x "
          f"({'ok' if ratio >= LOADER_RATIO else f'UNDER {LOADER_RATIO:.0f}x'})")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-tokens", type=float, default=1e6)
    parser.add_argument("--factor", type=int, default=100)
    parser.add_argument("--model", default="teacher_small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the files here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary working directory")
    parser.add_argument("--parts", default="1,2,3", help="which measurements, e.g. 1,3 (3 needs 2's runs for the "
                        "training rate unless --train-rate is given)")
    parser.add_argument("--train-rate", type=float, default=None, help="training tokens/s to compare the loader with")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"1", "2", "3"} or not parts:
        parser.error(f"--parts {args.parts!r}: a comma-separated subset of 1,2,3")
    if "3" in parts and "2" not in parts and args.train_rate is None:
        parser.error("--parts without 2 needs --train-rate for part 3")
    if not os.environ.get("ATM_DATA_MIRROR"):
        parser.error("set ATM_DATA_MIRROR to the data mirror (the corpora are real text)")

    from atm.data.corpora import written_corpus
    from atm.models.tokenizer import load_tokenizer, train_tokenizer

    work = args.workdir or Path(tempfile.mkdtemp(prefix="atm-bench-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ATM_DATA_DIR": str(work / "data"), "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    os.environ["ATM_DATA_DIR"] = env["ATM_DATA_DIR"]
    try:
        lines = [line.text for line in written_corpus()]
        tokenizer_dir = work / "tokenizer"
        if not tokenizer_dir.is_dir():
            train_tokenizer(random.Random(0).sample(lines, 20_000), tokenizer_dir, 8000, seed=0)
        tokenizer = load_tokenizer(tokenizer_dir)
        counts = [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]
        sizes = {"small": int(args.small_tokens), "large": int(args.small_tokens * args.factor)}
        files, written = {}, {}
        for name, tokens in sizes.items():
            files[name] = work / f"{name}.txt"
            sidecar = work / f"{name}.json"
            if files[name].is_file() and sidecar.is_file() and json.loads(sidecar.read_text())["asked"] == tokens:
                written[name] = tuple(json.loads(sidecar.read_text())["written"])  # the same corpus, kept
            else:
                written[name] = make_corpus(lines, counts, tokens, files[name], seed=len(name))
                sidecar.write_text(json.dumps({"asked": tokens, "written": written[name]}))
            print(f"corpus {name}: {written[name][0]:,} sub-tokens, {written[name][1]:,} lines, "
                  f"{files[name].stat().st_size / 2**20:,.0f} MiB")

        if "1" in parts:
            tokenizing(files["large"], max(written["small"][1], written["large"][1] // 10), tokenizer, work)
        train_rate = args.train_rate
        if "2" in parts:
            train_rate = memory(files, tokenizer_dir, work, args, env)
        if "3" in parts:
            loader(files["large"], tokenizer, work, args, train_rate)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
