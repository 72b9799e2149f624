"""The stages of the AlexaTM pipeline, one small module each over shared parts.

Every stage is a function ``run(cfg, inputs) -> metrics`` called inside its MLflow run by
:func:`atm.train.execute`; it logs its own metrics and artifacts and returns the final metrics (which
must contain ``cfg.stage.objective`` so a sweep can optimise it).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from omegaconf import DictConfig

from atm.errors import AtmError


@dataclass(frozen=True)
class Stage:
    """A registered stage.

    Attributes:
        name: the value of ``stage=`` on the command line.
        target: ``module:function`` of its ``run(cfg, inputs) -> dict[str, float]``.
        reads: the top-level config groups that define what it trains (they enter its config hash).
        artifact: the artifact directory consumers download (``checkpoint`` or ``tokenizer``).
        check: optional ``module:function`` validating the config before any input is resolved or trained
            (raises AtmError).
    """

    name: str
    target: str
    reads: tuple[str, ...]
    artifact: str = "checkpoint"
    check: str | None = None

    def hashed_keys(self, cfg: DictConfig) -> tuple[str, ...]:
        return ("stage", "seed", *self.reads, *cfg.stage.inputs, *cfg.stage.get("optional_inputs", []))

    @property
    def run(self) -> Callable:
        return _load(self.target)

    def validate(self, cfg: DictConfig) -> None:
        """Run the stage's config check, if it has one."""
        if self.check:
            _load(self.check)(cfg)


def _load(target: str) -> Callable:
    module, function = target.split(":")
    return getattr(import_module(module), function)


_MODEL = ("model", "trainer", "data")
STAGES = {s.name: s for s in (
    Stage("train_tokenizer", "atm.stages.tokenizer:run", ("tokenizer", "data"), artifact="tokenizer"),
    Stage("pretrain_stage1", "atm.stages.pretrain:run", _MODEL, check="atm.stages.pretrain:check"),
    Stage("pretrain_stage2", "atm.stages.pretrain:run", _MODEL, check="atm.stages.pretrain:check"),
    Stage("distill_intermediate", "atm.stages.distill:run", (*_MODEL, "distill", "augment"),
          check="atm.stages.distill:check"),
    Stage("distill_final", "atm.stages.distill:run", (*_MODEL, "distill", "augment"), check="atm.stages.distill:check"),
    Stage("finetune", "atm.stages.finetune:run", ("trainer", "data", "finetune"), check="atm.stages.finetune:check"),
    Stage("distill_task", "atm.stages.distill_task:run", ("trainer", "data", "finetune", "distill", "eval"),
          check="atm.stages.distill_task:check"),
    Stage("finetune_xnli", "atm.stages.finetune_xnli:run", ("trainer", "data", "eval"),
          check="atm.stages.finetune_xnli:check"),
    Stage("evaluate", "atm.stages.evaluate:run", ("data", "eval"), artifact="evaluation", check="atm.stages.evaluate:check"),
)}


def get_stage(name: str) -> Stage:
    """The stage called ``name``. Raises AtmError naming the unknown stage and the known ones."""
    try:
        return STAGES[name]
    except KeyError:
        raise AtmError(f"unknown stage '{name}' (known: {', '.join(STAGES)})") from None
