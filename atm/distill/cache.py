"""Teacher-output cache: a frozen teacher's outputs computed once and shared by every trial of a sweep.

A teacher's outputs are deterministic for a fixed teacher, data stream and augmentation, so a sweep over
losses, weights, temperatures or layer mappings needs the teacher forward pass only once. For training
step ``s`` the cache holds, as ``.npy`` files memory-mapped on read (``<dir>/<key>/step-<s>/``):

* the (augmented) batch the student must see: ``input_ids``, ``attention_mask``, ``labels`` (+ mixup keys);
* the teacher's logits at the scored positions: the top-k values (float16) and their vocabulary ids
  (int32) when ``top_k`` is set, else all logits (float16);
* the hidden states (float16 ``[B, T, D]``) and attention scores (float16 ``[B, H, T, T]``) of exactly
  the layers some trial asked for; a trial that needs another layer computes the teacher once more for
  that step and adds its file.

The key (:func:`cache_key`) covers everything that changes those tensors: the teacher (its run id or
path), the data settings, the seed and batch size (the data order), the corpus, the MLM masking rate,
the augmentation (:func:`atm.distill.augment.augmentation_key`), which positions are scored, and top-k.
Each file is written to a temporary name and renamed, so an interrupted trial leaves no partial entry.
With top-k logits the teacher distribution is renormalised over its k most likely tokens (the usual
approximation of cached/offline distillation, e.g. Shleifer & Rush 2020); ``logit_mse`` and
``logit_mse_over_t`` need all logits and are refused with ``top_k``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from atm.distill.losses import FULL_LOGIT_LOSSES
from atm.errors import AtmError
from atm.files import atomic_path

#: Logit value for vocabulary entries outside the cached top-k (softmax weight ~ e^-1e4 = 0).
MISSING_LOGIT = -1.0e4
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "mixup_index", "mixup_lambda", "repeat_index")


def cache_key(**parts: Any) -> str:
    """A 16-hex-digit key of everything that determines the cached tensors (JSON of ``parts``, sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(np.load(path, mmap_mode="r")))


class TeacherCache:
    """Per-step teacher outputs under ``root/key``.

    Args:
        root: cache directory (``distill.cache.dir``).
        key: :func:`cache_key` of the teacher, data and augmentation.
        top_k: keep the k largest logits per position (None: all).
        hidden_layers: indices of ``hidden_states`` the objective reads (0 = embeddings).
        attention_layers: indices of ``attentions`` the objective reads.
    """

    def __init__(self, root: str | os.PathLike, key: str, top_k: int | None,
                 hidden_layers: Iterable[int] = (), attention_layers: Iterable[int] = ()):
        self.dir = Path(root) / key
        self.top_k = top_k
        self.hidden_layers = sorted(set(hidden_layers))
        self.attention_layers = sorted(set(attention_layers))
        self.hits = 0
        self.misses = 0

    def _step_dir(self, step: int) -> Path:
        return self.dir / f"step-{step:07d}"

    def _needed(self, step: int) -> list[Path]:
        d = self._step_dir(step)
        logits = ["logit_values.npy", "logit_ids.npy"] if self.top_k else ["logits.npy"]
        names = ["input_ids.npy", "attention_mask.npy", "labels.npy", *logits,
                 *(f"hidden-{i}.npy" for i in self.hidden_layers),
                 *(f"attention-{i}.npy" for i in self.attention_layers)]
        return [d / name for name in names]

    def load(self, step: int, vocab_size: int, n_hidden: int, n_attention: int
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The cached ``(batch, teacher_outputs)`` of ``step``, or None when any needed file is missing.

        ``teacher_outputs`` follows :func:`atm.models.encoder.mlm_forward`: ``logits[N, V]`` (entries
        outside the top-k set to :data:`MISSING_LOGIT`), ``hidden_states``/``attentions`` tuples of length
        ``n_hidden``/``n_attention`` holding float32 tensors at the cached layers and None elsewhere.
        """
        if not all(path.is_file() for path in self._needed(step)):
            self.misses += 1
            return None
        self.hits += 1
        return self.read(step, vocab_size, n_hidden, n_attention)

    def read(self, step: int, vocab_size: int, n_hidden: int, n_attention: int
             ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Like :meth:`load` for an entry known to be complete (not counted as a hit)."""
        d = self._step_dir(step)
        batch = {name: _load(d / f"{name}.npy") for name in BATCH_KEYS if (d / f"{name}.npy").is_file()}
        if self.top_k:
            values, ids = _load(d / "logit_values.npy").float(), _load(d / "logit_ids.npy").long()
            logits = torch.full((values.shape[0], vocab_size), MISSING_LOGIT).scatter_(1, ids, values)
        else:
            logits = _load(d / "logits.npy").float()
        hidden = [None] * n_hidden
        for i in self.hidden_layers:
            hidden[i] = _load(d / f"hidden-{i}.npy").float()
        attentions = [None] * n_attention
        for i in self.attention_layers:
            attentions[i] = _load(d / f"attention-{i}.npy").float()
        out = {"logits": logits, "hidden_states": tuple(hidden) if n_hidden else None,
               "attentions": tuple(attentions) if n_attention else None,
               "attention_mask": batch["attention_mask"]}
        return batch, out

    def store(self, step: int, batch: Mapping[str, torch.Tensor], out: Mapping[str, Any]) -> None:
        """Write the batch and the teacher outputs of ``step`` (files already present are kept)."""
        d = self._step_dir(step)
        d.mkdir(parents=True, exist_ok=True)

        def put(name: str, tensor: torch.Tensor, dtype) -> None:
            path = d / f"{name}.npy"
            if not path.is_file():
                _save(path, tensor.detach().cpu().numpy().astype(dtype))

        for name in BATCH_KEYS:
            if name in batch:
                value = batch[name]
                put(name, value, np.float32 if value.is_floating_point() else np.int64)
        logits = out["logits"].float()
        if self.top_k:
            values, ids = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)
            put("logit_values", values, np.float16)
            put("logit_ids", ids, np.int32)
        else:
            put("logits", logits, np.float16)
        for i in self.hidden_layers:
            put(f"hidden-{i}", out["hidden_states"][i].float(), np.float16)
        for i in self.attention_layers:
            put(f"attention-{i}", out["attentions"][i].float(), np.float16)

    def size_bytes(self) -> int:
        """Bytes on disk under this key."""
        return sum(p.stat().st_size for p in self.dir.rglob("*.npy")) if self.dir.exists() else 0


def check_cache_config(distill_cfg) -> None:
    """Reject a cache setting that cannot work: the MSE logit losses (``FULL_LOGIT_LOSSES``) need every
    logit, so no ``top_k``.

    Raises:
        AtmError: naming ``distill.cache.top_k``.
    """
    cache = distill_cfg.get("cache")
    loss = distill_cfg.logit.loss
    if cache and cache.enabled and cache.top_k and loss in FULL_LOGIT_LOSSES:
        raise AtmError(f"distill.cache.top_k keeps only the teacher's top-k logits but distill.logit.loss={loss} "
                       f"needs all of them: set distill.cache.top_k=null or disable the cache")
