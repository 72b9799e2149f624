"""Trainable critics and baselines for the mutual-information distillation losses (``infonce``, ``mi_alpha``).

A critic ``f(x, y)`` scores how well a student vector ``x`` (``z_s``) and a teacher vector ``y`` (``z_t``)
belong together; the contrastive / variational MI bounds of :mod:`atm.distill.losses` are computed from
the ``[B, B]`` matrix ``S[i, j] = f(z_s_i, z_t_j)`` over a batch, positives on the diagonal.
Critics and baselines are owned by the distillation objective: trained in the student's optimiser, never
saved in the student checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from atm.errors import AtmError


def embedding(d_in: int, d_out: int, hidden_dim: int | None = None) -> nn.Module:
    """A small embedding network ``R^d_in -> R^d_out``: one linear layer, or (with ``hidden_dim``) an MLP
    ``Linear(d_in, hidden_dim) -> ReLU -> Linear(hidden_dim, d_out)``."""
    if hidden_dim is None:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(nn.Linear(d_in, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, d_out))


class SeparableCritic(nn.Module):
    """Separable critic ``f(x, y) = g(x) . h(y) / tau`` (Poole et al. 2019, sec. 4 "separable critic";
    the critic of CPC/InfoNCE, van den Oord et al. 2018, and of CRD, Tian et al. 2020, eq. 10).

    ``g: R^d_s -> R^critic_dim`` embeds the student vector, ``h: R^d_t -> R^critic_dim`` the teacher
    vector (each linear, or an MLP with ``hidden_dim``); with ``normalize`` both embeddings are
    L2-normalised first, so that ``f`` is a cosine similarity divided by ``tau`` (CRD's choice).

    Args:
        d_s, d_t: student and teacher widths.
        critic_dim: width of the shared embedding space.
        hidden_dim: hidden width of the two MLPs; None for linear embeddings.
        temperature: ``tau > 0``.
        normalize: L2-normalise the embeddings.

    Forward: ``x[B, d_s], y[B', d_t] -> S[B, B']`` with ``S[i, j] = f(x_i, y_j)``, float32.
    """

    def __init__(self, d_s: int, d_t: int, critic_dim: int = 128, hidden_dim: int | None = None,
                 temperature: float = 1.0, normalize: bool = False):
        super().__init__()
        if critic_dim < 1:
            raise AtmError(f"critic_dim must be a positive integer, got {critic_dim!r}")
        if not temperature > 0:
            raise AtmError(f"critic temperature must be positive, got {temperature!r}")
        self.g = embedding(d_s, critic_dim, hidden_dim)
        self.h = embedding(d_t, critic_dim, hidden_dim)
        self.temperature = float(temperature)
        self.normalize = bool(normalize)

    def embed(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g(x), h(y))`` in float32, normalised when ``normalize``."""
        gx, hy = self.g(x).float(), self.h(y).float()
        if self.normalize:
            gx, hy = nn.functional.normalize(gx, dim=-1), nn.functional.normalize(hy, dim=-1)
        return gx, hy

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gx, hy = self.embed(x, y)
        return gx @ hy.T / self.temperature


class Baseline(nn.Module):
    """Learned log-baseline ``a(y) ~ log q(y)`` of the TUBA / NWJ / interpolated bounds (Poole et al. 2019,
    eq. 7-8 and 11): a linear layer or MLP ``R^d -> R``. The output layer starts at zero, so ``a = 0``
    until trained. Forward: ``y[B, d] -> a[B]`` (float32)."""

    def __init__(self, d: int, hidden_dim: int | None = None):
        super().__init__()
        self.net = embedding(d, 1, hidden_dim)
        last = self.net if isinstance(self.net, nn.Linear) else self.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y).float().squeeze(-1)
