"""Toy Hydra app for the atm_optuna sweeper tests: minimise (x - 1)^2 + penalty[y]."""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from atm.errors import Interrupted
from atm.sweeps import trial_from_config


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    number = cfg.optuna.trial_number if "optuna" in cfg else None
    value = (float(cfg.x) - 1.0) ** 2 + {"a": 0.0, "b": 0.5}[cfg.y]
    extra = OmegaConf.to_container(cfg.extra) if "extra" in cfg else None  # only via +extra.*
    if extra and "alpha" in extra:
        value += float(extra["alpha"])
    record = {
        "trial_number": number, "x": cfg.x, "y": cfg.y, "mode": cfg.mode, "extra": extra,
        "value": value,
    }
    trial = trial_from_config(cfg)
    if trial is not None:
        record["helper_trial_number"] = trial.number
        if cfg.report:
            trial.report(value + 1.0, step=0)
    if cfg.marker_dir:
        Path(cfg.marker_dir).mkdir(parents=True, exist_ok=True)
        Path(cfg.marker_dir, f"{number}.json").write_text(json.dumps(record))
    if number in cfg.fail_on:
        raise RuntimeError(f"boom in trial {number}")
    if number in cfg.interrupt_on and not Path(cfg.marker_dir, f"interrupted-{number}").exists():
        Path(cfg.marker_dir, f"interrupted-{number}").touch()  # once: the retry of the trial runs through
        raise Interrupted(f"interrupted at step 3 of trial {number}; rerun the same command", 3)
    if number in cfg.nan_on:
        return float("nan")
    return value


if __name__ == "__main__":
    main()
