"""The Hydra ``Sweeper`` plugin class (thin: Optuna is only imported when a sweep starts)."""

from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from .config import AtmOptunaSweeperConf  # noqa: F401  (registers hydra/sweeper: atm_optuna)


class AtmOptunaSweeper(Sweeper):
    """Optuna ask/tell search; see :mod:`hydra_plugins.atm_optuna_sweeper` for the contract."""

    def __init__(self, **config: Any) -> None:
        from ._sweeper import AtmOptunaSweeperImpl

        self._impl = AtmOptunaSweeperImpl(**config)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self._impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self._impl.sweep(arguments)
