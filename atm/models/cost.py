"""Student cost: parameter counts and measured CPU latency per utterance (the second axis of a
quality-versus-cost sweep, see ``sweeps/student_cost.yaml``).

Metric names: ``cost/parameters`` (every unique parameter of the model), ``cost/non_embedding_parameters``
(without the embedding tables and the vocabulary-sized output bias, the convention of AlexaTM and of Kaplan
et al. 2020, see :func:`atm.models.encoder.count_parameters`) and ``cost/latency_ms``.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from atm.errors import AtmError
from atm.models.encoder import count_parameters


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    """``cost/parameters`` and ``cost/non_embedding_parameters`` of ``model`` (tied weights counted once)."""
    return {"cost/parameters": float(count_parameters(model)),
            "cost/non_embedding_parameters": float(count_parameters(model, non_embedding=True))}


@torch.inference_mode()
def cpu_latency_ms(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, runs: int = 20,
                   warmup: int = 3, max_seq_len: int = 128, threads: int | None = 1) -> float:
    """Median wall time in milliseconds of one forward pass over one utterance (batch 1) on CPU.

    The utterances ``texts`` are taken in turn; ``warmup`` passes are run first and not timed, then ``runs``
    timed passes. The model is copied to the CPU (in eval mode) when it lives elsewhere, so training state is
    untouched. ``threads`` pins torch's intra-op threads for the measurement (1: one core per utterance, the
    usual serving setting; None: leave as is).

    Raises:
        AtmError: no utterance, or ``runs`` < 1.
    """
    if not texts:
        raise AtmError("cost: no utterances to time")
    if runs < 1:
        raise AtmError(f"cost.latency_runs={runs}: must be >= 1 (or set it to 0 to skip timing)")
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    cpu_model = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = cpu_model.training
    cpu_model.eval()
    encoded = [tokenizer(t, truncation=True, max_length=max_seq_len, return_tensors="pt") for t in texts]
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        times = []
        for i in range(warmup + runs):
            batch = encoded[i % len(encoded)]
            start = time.perf_counter()
            cpu_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(saved)
        cpu_model.train(was_training)
    return statistics.median(times)


def measure(model: torch.nn.Module, tokenizer: Any, cfg: DictConfig) -> dict[str, float]:
    """Parameter counts plus ``cost/latency_ms`` (:func:`cpu_latency_ms` with ``cost.latency_runs``,
    ``cost.warmup_runs``, ``cost.threads``) over ``cost.utterances`` held-out spoken utterances (MASSIVE dev,
    ``cost.locale``), truncated to ``data.max_seq_len``; latency is left out when ``cost.latency_runs`` is 0.
    Logged to the active MLflow run, the utterances as the dataset ``cost/massive_dev`` (context ``evaluation``,
    :mod:`atm.data.mlflow_datasets`)."""
    import mlflow

    from atm.data.corpora import heldout_spoken

    c = cfg.cost
    metrics = parameter_counts(model)
    if c.latency_runs:
        texts = [line.text for line in heldout_spoken(c.utterances, locales=[c.locale], log_as="cost/massive_dev")]
        metrics["cost/latency_ms"] = cpu_latency_ms(
            model, tokenizer, texts, runs=c.latency_runs, warmup=c.warmup_runs,
            max_seq_len=cfg.data.max_seq_len, threads=c.threads)
    mlflow.log_metrics(metrics)
    return metrics
