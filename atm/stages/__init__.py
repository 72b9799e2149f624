"""The stages of the AlexaTM pipeline: leaf modules over shared layers, each declared with :func:`stage`.

Every stage is a function ``run(cfg, inputs) -> metrics`` called inside its MLflow run by
:func:`atm.train.execute` (through :mod:`atm.run`); it logs its own metrics and artifacts and returns the final
metrics (which must contain ``cfg.stage.objective`` so a sweep can optimise it). A stage module imports
:mod:`atm.stages.common`, :mod:`atm.stages.registry` and the layers below (models, probes, tasks, data,
engine, distill, tracking), never another stage module. The registry (:mod:`atm.stages.registry`) is
re-exported here.
"""

from __future__ import annotations

from atm.stages.registry import (
    Stage,
    all_stages,
    canonical_name,
    get_stage,
    import_stage_module,
    stage,
    stage_of,
    stages_of_kind,
)

__all__ = ["Stage", "all_stages", "canonical_name", "get_stage", "import_stage_module", "stage", "stage_of",
           "stages_of_kind"]
