"""Layer mappings: pure functions ``(n_teacher_layers, n_student_layers) -> [(student, teacher), ...]``.

Indices address ``hidden_states`` as returned by transformers with ``output_hidden_states=True``:
0 is the embedding output, ``i`` the output of transformer layer ``i``.
"""

from __future__ import annotations

from typing import Callable

from atm.errors import AtmError

Mapping = list[tuple[int, int]]
MAPPINGS: dict[str, Callable[[int, int], Mapping]] = {}


def register_mapping(name: str) -> Callable:
    """Decorator: register a layer mapping under ``name``."""

    def wrap(fn: Callable[[int, int], Mapping]) -> Callable[[int, int], Mapping]:
        MAPPINGS[name] = fn
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


@register_mapping("last")
def last(n_teacher: int, n_student: int) -> Mapping:
    """Only the last layers: ``[(M, N)]`` (Distiller, He et al. 2021, sec. 3.2)."""
    return [(n_student, n_teacher)]


def get_mapping(name: str, n_teacher: int, n_student: int) -> Mapping:
    """The pairs of mapping ``name``. Raises AtmError for an unknown name or an impossible shape."""
    if name not in MAPPINGS:
        raise AtmError(f"distill.hidden.layer_mapping={name!r} is not a known layer mapping "
                       f"(known: {', '.join(MAPPINGS)})")
    return MAPPINGS[name](n_teacher, n_student)
