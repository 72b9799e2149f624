"""A tiny classifier trained by :func:`atm.engine.loop.fit`, for the DeepSpeed tests: run with ``python`` (one
process) or ``torchrun --nproc_per_node N`` (N processes, gloo on CPU).

Usage: ``deepspeed_app.py OUT.json backend batch_size grad_accum_steps zero_stage [state_dir]``. Rank 0 writes
the mean training loss, the steps it trained and the final parameters to ``OUT.json``.
"""

from __future__ import annotations

import json
import sys

import torch
from omegaconf import OmegaConf

from atm.data.collate import BatchStream
from atm.engine.loop import fit


class Classifier(torch.nn.Module):
    """Mean-pooled embeddings -> linear layer; a per-example loss, so that the mean over the ranks' batches
    equals the mean over the global batch."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(40, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids).mean(1))


def collate(items):
    return {"input_ids": torch.tensor([i["input_ids"] for i in items]),
            "labels": torch.tensor([i["label"] for i in items])}


def main(out: str, backend: str, batch_size: int, accum: int, zero_stage: int, state_dir: str | None = None) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(0, 40, (5,), generator=g).tolist(), "label": i % 3} for i in range(64)]
    model = Classifier()
    cfg = OmegaConf.create({
        "max_steps": 12, "batch_size": batch_size, "grad_accum_steps": accum, "lr": 0.05, "weight_decay": 0.01,
        "warmup_steps": 2, "grad_clip": 0.5, "precision": "fp32", "log_every": 12, "backend": backend,
        "deepspeed": {"zero_stage": zero_stage, "config": None},
        "state_every": 4 if state_dir else None, "keep_last": 2})

    calls = []

    def loss_fn(batch, step):
        calls.append(step)
        return torch.nn.functional.cross_entropy(model(batch["input_ids"]), batch["labels"]), {}

    summary = fit(model, BatchStream(examples, batch_size, collate, seed=5), loss_fn, cfg, log_metrics=False,
                  state_dir=state_dir)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        with open(out, "w") as handle:
            json.dump({"loss": summary["train/loss"], "steps_trained": sorted(set(calls)),
                       "params": {k: v.tolist() for k, v in model.state_dict().items()}}, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
         sys.argv[6] if len(sys.argv) > 6 else None)
