"""The sweep loop of the ``atm_optuna`` sweeper: ask, launch, tell, then the reports.

:class:`AtmOptunaSweeperImpl` is what the Hydra plugin class (``atm_optuna_sweeper.AtmOptunaSweeper``) runs.
It builds the search space (:mod:`._space`), checks the settings (:mod:`._validation`) and that every
choice composes with the app config, opens the study and asks for trials within the global budget
(:mod:`._study`), launches them through Hydra's launcher, records each outcome, and at the end writes
``optimization_results.yaml`` and runs the ``report`` hook. The modules whose names start with ``_`` are
skipped by Hydra's plugin scan, so that Optuna and SQLAlchemy are imported only when a sweep actually runs.
"""

import importlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from atm.errors import Interrupted
from atm.sweeps import PRUNER_ATTR
from atm.sweeps.pruners import SweepError, make_pruner
from atm.sweeps.register import check_sweep as check_register_best

from ._space import Param, build_search_space, probe_assignments, sample
from ._study import (
    Heartbeat,
    ask_within_budget,
    fail_interrupted,
    first_line,
    infrastructure_failure,
    normalize_storage,
    open_study,
    retry_callback,
    retry_failed,
    safe_url,
    stage_started,
)
from ._validation import SweeperSettings

log = logging.getLogger(__name__)


def _quote(text: str) -> str:
    return QuotedString(text=text, quote=Quote.single).with_quotes()


def _objective_values(value: Any, n_objectives: int) -> Tuple[Optional[List[float]], str]:
    """(values, "") or (None, why the return value is not a usable objective)."""
    if value is None:
        return None, "the job returned None (the task function must return its objective)"
    seq = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        if any(isinstance(v, (str, bytes, bool)) for v in seq):
            raise TypeError
        values = [float(v) for v in seq]
    except (TypeError, ValueError):
        return None, f"the job returned {value!r}, not a number"
    if len(values) != n_objectives:
        return None, f"the job returned {len(values)} value(s) for {n_objectives} objective(s)"
    if any(math.isnan(v) for v in values):
        return None, "the job returned NaN"
    return values, ""


class AtmOptunaSweeperImpl(SweeperSettings):
    """The sweeper: :class:`SweeperSettings` plus Hydra's context (:meth:`setup`) and the loop (:meth:`sweep`)."""

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # -- what the jobs get, and the pre-flight composition check ------------------------------

    def _check_composition(
        self, space: Dict[str, Param], fixed: List[str], url: Optional[str], name: str
    ) -> None:
        """Compose the app config with every choice of every param (catches bad keys/options);
        a conditional param is probed with its condition true."""
        seen = set()
        for values in probe_assignments(space):
            overrides = fixed + [space[n].override(v) for n, v in values.items()]
            overrides += self._trial_overrides(name, url, 0)
            if tuple(overrides) in seen:
                continue
            seen.add(tuple(overrides))
            try:
                self.hydra_context.config_loader.load_sweep_config(
                    master_config=self.config, sweep_overrides=overrides
                )
            except Exception as e:
                raise SweepError(
                    f"hydra.sweeper.params: overrides do not compose with the app config: {e}"
                ) from None

    def _trial_overrides(self, name: str, url: Optional[str], number: int) -> List[str]:
        """The ``++optuna.*`` overrides every job gets (study name, storage URL, trial number, objectives)."""
        storage = "null" if url is None else _quote(url)
        out = [
            f"++optuna.study_name={_quote(name)}",
            f"++optuna.storage={storage}",
            f"++optuna.trial_number={number}",
        ]
        if self.objectives:
            out.append(f"++optuna.objectives=[{','.join(_quote(str(o)) for o in self.objectives)}]")
        return out

    def _open_study(self, url: Optional[str], name: str, directions: List[str]) -> optuna.Study:
        """Create or load the study with this sweep's heartbeat settings (:func:`._study.open_study`)."""
        return open_study(
            url,
            name,
            directions,
            load_if_exists=self.load_if_exists,
            heartbeat_interval=self.heartbeat_interval,
            grace_period=self.grace_period,
            max_retry=self.max_retry,
        )

    # -- the sweep -------------------------------------------------------------------------

    def sweep(self, arguments: List[str]) -> List[Sequence[JobReturn]]:
        """Validate everything, then ask/launch/tell until the study has ``n_trials`` finished.

        Several workers (processes, machines) may run the same command on one RDB storage: the
        trial budget is global (a worker asks only while COMPLETE + PRUNED + RUNNING + WAITING <
        ``n_trials``, under a lock in the storage's database, see :mod:`atm.sweeps.locks`), and a
        worker whose budget is used up waits for the running trials of the others, so that a trial
        whose worker died is failed by heartbeat and retried (same params) by a live worker.

        Raises SweepError (an AtmError) on a bad config before any job runs, and after the
        sweep if every trial of this run failed.
        """
        directions = self._directions()
        self._validate(directions)
        if self.config.get("tracking") is not None:  # an atm app: tracking.register_best needs one best trial
            check_register_best(self.config, len(directions))
        sampler_name = self.sampler_spec.get("name", "tpe")

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space, fixed_by_name = build_search_space(self.params, arguments, parser)
        fixed = list(fixed_by_name.values())
        if not space:
            log.warning("empty search space: jobs must suggest params through trial_from_config")

        name = self.study_name or str(self.config.hydra.job.name)
        url = normalize_storage(self.storage)
        self._make_sampler(space, 0)  # validate kwargs / grid space before touching storage
        self._check_composition(space, fixed, url, name)
        study = self._open_study(url, name, directions)
        study.sampler = self._make_sampler(space, len(study.get_trials(deepcopy=False)))
        study.pruner, _ = make_pruner(self.pruner_spec)
        if url is not None:
            study.set_user_attr(PRUNER_ATTR, dict(self.pruner_spec))

        target = self.n_trials
        if sampler_name == "grid":
            target = min(target, math.prod(len(p.grid_values()) for p in space.values()))
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        finished = len(study.get_trials(deepcopy=False, states=done))
        remaining = max(0, target - finished)  # this run's attempts at most (failed ones included)
        log.info(
            f"Optuna study {name!r} in {safe_url(url)}: {finished} finished trial(s), "
            f"running {remaining} more (n_trials={self.n_trials}, sampler={sampler_name})"
        )

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        heart = None
        if url is not None and self.heartbeat_interval:
            heart = Heartbeat(study._storage, self.heartbeat_interval)
        returns: List[Sequence[JobReturn]] = []
        n_ok, n_failed, first_error = 0, 0, ""
        waiting_since = 0.0
        try:
            while remaining > 0:
                trials = self._ask(study, space, url, name, target, min(self.n_jobs, remaining), heart)
                if not trials:
                    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if heart is None or not running:
                        break
                    if not waiting_since:
                        waiting_since = time.monotonic()
                        log.info(
                            f"budget used up; waiting for {len(running)} running trial(s) of other"
                            f" workers ({', '.join(f'#{t.number}' for t in running)})"
                        )
                    time.sleep(min(self.heartbeat_interval, 5))
                    continue
                waiting_since = 0.0
                try:
                    batch = [
                        fixed
                        + [space[n].override(v) for n, v in sample(space, t).items()]
                        + self._trial_overrides(name, url, t.number)
                        for t in trials
                    ]
                    results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
                except BaseException:
                    # an in-memory study ends with the process: no retry
                    fail_interrupted(study, trials, retry_callback(self.max_retry) if url is not None else None)
                    raise
                finally:
                    if heart is not None:
                        heart.discard([t._trial_id for t in trials])
                n_retried = 0
                interrupted = None
                for trial, result in zip(trials, results):
                    if _interrupted(result):  # Ctrl-C inside a job's training loop: retry the trial, then stop
                        fail_interrupted(study, [trial], retry_callback(self.max_retry) if url is not None else None)
                        interrupted = interrupted or result._return_value
                        continue
                    if url is not None and self._retry_infrastructure_failure(study, trial, result):
                        n_retried += 1  # its retry (WAITING) is asked first; it does not use up an attempt
                        continue
                    error = self._tell(study, trial, result, len(directions))
                    if error:
                        n_failed += 1
                        first_error = first_error or f"trial #{trial.number}: {error}"
                    else:
                        n_ok += 1
                remaining -= len(trials) - n_retried
                returns.append(results)
                if interrupted is not None:
                    raise interrupted
        finally:
            if heart is not None:
                heart.stop()

        self._report(study, sweep_dir, name, url)
        self._user_report(study, sweep_dir)
        if n_failed and not n_ok:
            raise SweepError(f"all {n_failed} trial(s) of this sweep failed; first: {first_error}")
        return returns

    def _ask(
        self,
        study: optuna.Study,
        space: Dict[str, Param],
        url: Optional[str],
        name: str,
        target: int,
        limit: int,
        heart: Optional[Heartbeat],
    ) -> List[optuna.Trial]:
        """Up to ``limit`` trials within the global budget ``target`` (:func:`._study.ask_within_budget`),
        the sampler reseeded before each ask (the grid sampler keeps its instance)."""
        grid = self.sampler_spec.get("name", "tpe") == "grid"
        reseed = None if grid else (lambda n: self._make_sampler(space, n))
        return ask_within_budget(study, url, name, target, limit, heart, reseed)

    def _user_report(self, study: optuna.Study, sweep_dir: Path) -> None:
        if not self.report:
            return
        module, _, function = str(self.report).partition(":")
        try:
            getattr(importlib.import_module(module), function)(
                study=study, sweep_dir=sweep_dir, config=self.config
            )
        except Exception as e:  # the trials are recorded; a failing plot must not fail the sweep
            log.warning(f"hydra.sweeper.report {self.report}: {first_line(e)}", exc_info=True)

    def _retry_infrastructure_failure(self, study: optuna.Study, trial: optuna.Trial, result: JobReturn) -> bool:
        """A job that failed before its stage started (no MLflow run attached to the trial) with a database or
        connection error (:func:`._study.infrastructure_failure`, e.g. a store being created by another worker)
        is not the recipe's fault: its trial is failed and retried with the same params, like a trial whose
        worker died (:func:`._study.retry_failed`, up to ``max_retry`` times). Returns whether it was retried."""
        err = result._return_value
        if result.status == JobStatus.COMPLETED or not isinstance(err, BaseException):
            return False
        if not infrastructure_failure(err) or stage_started(study, trial):
            return False
        retries = retry_failed(study, trial, self.max_retry)
        if retries is None:
            return False  # recorded as FAIL by retry_failed; _tell logs it
        log.warning(
            f"trial #{trial.number} failed before its stage started ({first_line(err)}); retried with the same"
            f" params (retry {retries + 1})"
        )
        return True

    def _tell(
        self, study: optuna.Study, trial: optuna.Trial, result: JobReturn, n_obj: int
    ) -> str:
        """Record a job's outcome; returns "" on success/pruning, else a one-line reason."""
        n = trial.number
        if result.status != JobStatus.COMPLETED:
            err = result._return_value
            if isinstance(err, optuna.TrialPruned):
                study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
                log.info(f"trial #{n} pruned")
                return ""
            reason = f"{type(err).__name__}: {err}"
            exc_info = (type(err), err, err.__traceback__) if isinstance(err, Exception) else None
            log.error(f"trial #{n} failed ({reason}); recorded as FAIL", exc_info=exc_info)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            return reason
        values, problem = _objective_values(result._return_value, n_obj)
        if values is None:
            log.warning(f"trial #{n}: {problem}; recorded as FAIL")
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            return problem
        shown = values[0] if n_obj == 1 else values
        frozen = study.tell(trial, shown, skip_if_finished=True)
        log.info(f"trial #{n} value={shown} params={frozen.params}")
        return ""

    def _report(self, study: optuna.Study, sweep_dir: Path, name: str, url: Optional[str]) -> None:
        counts = {s: 0 for s in ("complete", "pruned", "fail", "running")}
        for t in study.get_trials(deepcopy=False):
            if t.state.name.lower() in counts:
                counts[t.state.name.lower()] += 1
        results: Dict[str, Any] = {
            "name": "atm_optuna",
            "study_name": name,
            "storage": safe_url(url),
            "directions": [d.name.lower() for d in study.directions],
            "n_trials": counts,
        }
        if len(study.directions) == 1:
            b = study.best_trial if counts["complete"] else None
            results.update(
                best_trial=b.number if b else None,
                best_value=b.value if b else None,
                best_params=dict(b.params) if b else None,
            )
            if b:
                log.info(f"best trial #{b.number} value={b.value} params={b.params}")
            else:
                log.warning("no completed trial in the study; no best trial")
        else:
            best = study.best_trials if counts["complete"] else []
            results["best_trials"] = [
                {"number": t.number, "values": t.values, "params": dict(t.params)} for t in best
            ]
            log.info(f"Pareto front: {[(t.number, t.values) for t in best]}")
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")


def _interrupted(result: JobReturn) -> bool:
    """Whether a job ended by the user's Ctrl-C: :class:`atm.errors.Interrupted` (raised by the training loop,
    which the job runner reports as the job's failure) or a ``KeyboardInterrupt``. The sweep stops there, as the
    command would without a sweep."""
    return result.status != JobStatus.COMPLETED and isinstance(result._return_value, (Interrupted, KeyboardInterrupt))
