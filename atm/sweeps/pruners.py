"""The sweep's pruner, as the ``atm_optuna`` sweeper and its jobs both build it.

The sweeper validates ``hydra.sweeper.pruner`` and stores it on the study (user attribute
:data:`atm.sweeps.PRUNER_ATTR`); each job rebuilds the same pruner from it (:func:`atm.sweeps.trial_from_config`,
:func:`atm.sweeps.report_every`). :class:`SweepError` is the error of a bad sweep setting, raised here and
throughout the sweeper plugin (``hydra_plugins/atm_optuna_sweeper``, which imports it from here: the plugin
depends on atm, never the other way round).
"""

from __future__ import annotations

from typing import Any

import optuna
from hydra.errors import CompactHydraException

from atm.errors import AtmError

PRUNERS = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
}


class SweepError(AtmError, CompactHydraException):
    """An :class:`AtmError` that Hydra prints as its one-line message (no traceback)."""


def make_pruner(spec: Any) -> tuple[optuna.pruners.BasePruner, int]:
    """The pruner of a ``hydra.sweeper.pruner`` spec.

    Args:
        spec: ``{name: ..., report_every: N, **pruner kwargs}`` (a mapping or None; None means no pruner).

    Returns:
        (Optuna pruner, report_every): ``report_every`` is the number of training steps between two reports
        (0: none).

    Raises:
        SweepError: naming ``hydra.sweeper.pruner``, for an unknown name, a bad ``report_every`` or bad kwargs.
    """
    spec = dict(spec or {})
    name = spec.pop("name", "none")
    every = spec.pop("report_every", 0) or 0
    if not isinstance(name, str) or name not in PRUNERS:
        raise SweepError(
            f"hydra.sweeper.pruner.name: unknown pruner {name!r} (choose from {', '.join(PRUNERS)})"
        )
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise SweepError(f"hydra.sweeper.pruner.report_every: expected an int >= 0, got {every!r}")
    if name != "none" and not every:
        raise SweepError(
            f"hydra.sweeper.pruner.report_every: pruner {name!r} needs jobs to report every N steps"
            " (set report_every: N)"
        )
    if name == "none":  # switching a configured pruner off by name keeps its kwargs for later
        return optuna.pruners.NopPruner(), every
    try:
        return PRUNERS[name](**spec), every
    except (TypeError, ValueError) as e:
        raise SweepError(f"hydra.sweeper.pruner: {e}") from None
