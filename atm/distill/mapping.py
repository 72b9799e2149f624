"""Layer mappings: pure functions ``(n_teacher_layers, n_student_layers) -> [(student, teacher), ...]``.

Indices address ``hidden_states`` as returned by transformers with ``output_hidden_states=True``:
0 is the embedding output, ``i`` the output of transformer layer ``i`` (attention maps of layer ``i``
are ``attentions[i - 1]``). Only ``uniform`` maps the embeddings (pair ``(0, 0)``); the PKD mappings
``skip`` and ``last`` map student layers 1 .. M-1 and leave the top layer to the logit loss.

A *soft* mapping (``emd``) lists every (student, teacher) pair of transformer layers; the objective
weights the pairs by a transport plan computed from the per-pair losses (:func:`transport_plan`).
"""

from __future__ import annotations

from typing import Callable

import torch

from atm.errors import AtmError

Mapping = list[tuple[int, int]]
MAPPINGS: dict[str, Callable[[int, int], Mapping]] = {}
SOFT_MAPPINGS: set[str] = set()


def register_mapping(name: str, soft: bool = False) -> Callable:
    """Decorator: register a layer mapping under ``name`` (``soft``: pairs are weighted by a transport plan)."""

    def wrap(fn: Callable[[int, int], Mapping]) -> Callable[[int, int], Mapping]:
        MAPPINGS[name] = fn
        if soft:
            SOFT_MAPPINGS.add(name)
        return fn

    return wrap


def _check(n_teacher: int, n_student: int, name: str) -> None:
    if n_student > n_teacher:
        raise AtmError(f"layer_mapping={name}: the student has more layers ({n_student}) than the teacher "
                       f"({n_teacher})")


@register_mapping("uniform")
def uniform(n_teacher: int, n_student: int) -> Mapping:
    """TinyBERT's uniform mapping g(m) = m * N / M (Jiao et al. 2020, sec. 3.3), with the embedding layer
    mapped to itself: ``[(0, 0), (1, N/M), ..., (M, N)]``; g(m) is floored when M does not divide N."""
    _check(n_teacher, n_student, "uniform")
    return [(0, 0)] + [(m, m * n_teacher // n_student) for m in range(1, n_student + 1)]


@register_mapping("skip")
def skip(n_teacher: int, n_student: int) -> Mapping:
    """PKD-Skip (Sun et al. 2019, sec. 3.1): student layer m learns teacher layer m * N / M for
    m = 1 .. M-1; the last layer is left to the logit loss. 12 -> 4: ``[(1, 3), (2, 6), (3, 9)]``."""
    _check(n_teacher, n_student, "skip")
    return [(m, m * n_teacher // n_student) for m in range(1, n_student)]


@register_mapping("last")
def last(n_teacher: int, n_student: int) -> Mapping:
    """PKD-Last (Sun et al. 2019, sec. 3.1): student layer m learns teacher layer N - M + m for
    m = 1 .. M-1, i.e. the teacher's last M-1 layers below its top one; like ``skip``, the last layer pair
    is left to the logit loss (the official PKD code distils 12 -> 3 from teacher layers 10 and 11).
    12 -> 4: ``[(1, 9), (2, 10), (3, 11)]``; a 1-layer student maps no layer."""
    _check(n_teacher, n_student, "last")
    return [(m, n_teacher - n_student + m) for m in range(1, n_student)]


@register_mapping("first")
def first(n_teacher: int, n_student: int) -> Mapping:
    """The teacher's first M layers, ``[(m, m)]`` (Distiller, He et al. 2021, sec. 3.2)."""
    _check(n_teacher, n_student, "first")
    return [(m, m) for m in range(1, n_student + 1)]


@register_mapping("emd", soft=True)
def emd(n_teacher: int, n_student: int) -> Mapping:
    """Many-to-many (BERT-EMD, Li et al. 2020): every student layer against every teacher layer,
    ``[(m, n) for m in 1..M for n in 1..N]``, weighted by the transport plan of :func:`transport_plan`."""
    return [(m, n) for m in range(1, n_student + 1) for n in range(1, n_teacher + 1)]


def get_mapping(name: str, n_teacher: int, n_student: int) -> Mapping:
    """The pairs of mapping ``name``. Raises AtmError for an unknown name or an impossible shape."""
    if name not in MAPPINGS:
        raise AtmError(f"distill.intermediate.layer_mapping={name!r} is not a known layer mapping "
                       f"(known: {', '.join(MAPPINGS)})")
    return MAPPINGS[name](n_teacher, n_student)


@torch.no_grad()
def transport_plan(cost: torch.Tensor, epsilon: float = 0.05, iterations: int = 100) -> torch.Tensor:
    """Entropic optimal transport between student layers (mass 1/M each) and teacher layers (mass 1/N
    each) for a cost matrix ``cost[M, N]`` (Sinkhorn iterations, Cuturi 2013), as the layer-alignment
    flow of BERT-EMD (Li et al. 2020, eq. 6-9). Returns the plan ``[M, N]`` (rows sum to 1/M, columns to
    1/N); no gradient flows through it. ``epsilon`` is relative to the mean cost.
    """
    m, n = cost.shape
    c = cost.float() / cost.float().mean().clamp_min(1e-12)
    log_k = -c / epsilon
    log_a = torch.full((m,), -torch.log(torch.tensor(float(m))))
    log_b = torch.full((n,), -torch.log(torch.tensor(float(n))))
    u, v = torch.zeros(m), torch.zeros(n)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(log_k + v[None, :], dim=1)
        v = log_b - torch.logsumexp(log_k + u[:, None], dim=0)
    return torch.exp(u[:, None] + log_k + v[None, :])
