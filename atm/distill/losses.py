"""The one loss registry. Each loss is a function registered by name with :func:`register_loss`.

Conventions: teacher tensors end in ``_t``, student tensors in ``_s``. Logit losses take
``logits_s, logits_t`` of shape ``[N, C]`` (N positions or examples, C classes or vocabulary entries) and
a temperature; hidden-state losses take ``h_s, h_t`` of shape ``[B, T, D]`` (student already projected to
the teacher's width) and ``mask[B, T]`` (1 for real tokens). Every loss returns a scalar mean.
Adding a loss is one decorated function here plus its golden-value test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from atm.errors import AtmError

KINDS = ("hard", "logit", "hidden")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its name, kind (``hard``, ``logit`` or ``hidden``) and function."""

    name: str
    kind: str
    fn: Callable[..., torch.Tensor]


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, kind: str) -> Callable:
    """Decorator: register ``fn`` as loss ``name`` of ``kind`` (one of :data:`KINDS`)."""
    assert kind in KINDS, kind

    def wrap(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' registered twice")
        LOSSES[name] = LossSpec(name, kind, fn)
        return fn

    return wrap


def get_loss(name: str, kind: str, key: str = "loss") -> LossSpec:
    """The registered loss ``name``, which must be of ``kind``.

    Raises:
        AtmError: unknown name or wrong kind, naming the config ``key`` and the known losses of that kind.
    """
    spec = LOSSES.get(name)
    if spec is None or spec.kind != kind:
        known = ", ".join(n for n, s in LOSSES.items() if s.kind == kind)
        raise AtmError(f"{key}={name!r} is not a known {kind} loss (known: {known})")
    return spec


@register_loss("mlm_ce", "hard")
def mlm_ce(logits_s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MLM cross-entropy: mean over positions with ``labels != -100`` of ``-log softmax(z_s)[label]``.

    Shapes: ``logits_s[..., V]``, ``labels[...]`` (Devlin et al. 2019).
    """
    return F.cross_entropy(logits_s.reshape(-1, logits_s.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


@register_loss("soft_ce", "logit")
def soft_ce(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy against the teacher's distribution at temperature T:
    ``mean_n  - sum_c softmax(z_t / T)_c * log softmax(z_s / T)_c``
    (Hinton et al. 2015, eq. 1 with the cross-entropy; DistilBERT's L_ce, Sanh et al. 2019; AlexaTM sec. 3.3).
    Shapes ``[N, C]``; returns nats per position.
    """
    p_t = F.softmax(logits_t.float() / temperature, dim=-1)
    return -(p_t * F.log_softmax(logits_s.float() / temperature, dim=-1)).sum(-1).mean()


@register_loss("kl", "logit")
def kl(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL divergence ``mean_n KL(softmax(z_t/T) || softmax(z_s/T))`` (Hinton et al. 2015; Distiller, He et
    al. 2021, sec. 3.1). Equals :func:`soft_ce` minus the teacher's entropy, so it has the same gradient in
    the student. Shapes ``[N, C]``; nats per position.
    """
    log_p_t = F.log_softmax(logits_t.float() / temperature, dim=-1)
    log_p_s = F.log_softmax(logits_s.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()


@register_loss("logit_mse", "logit")
def logit_mse(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean squared error between logits, ``mean_{n,c} (z_s - z_t)^2`` (Ba & Caruana 2014; Kim et al. 2021).
    The temperature does not apply. Shapes ``[N, C]``.
    """
    return F.mse_loss(logits_s.float(), logits_t.float())


@register_loss("hidden_mse", "hidden")
def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden-state MSE over real tokens, ``sum_{b,t: mask=1} ||h_s W - h_t||^2 / (n_tokens * D)``
    (TinyBERT, Jiao et al. 2020, eq. 8; ``h_s`` is already projected by W). Shapes ``[B, T, D]``, ``mask[B, T]``.
    """
    m = mask.unsqueeze(-1).to(h_s.dtype)
    sq = ((h_s.float() - h_t.float()) ** 2) * m
    return sq.sum() / (m.sum() * h_s.shape[-1]).clamp_min(1.0)
