"""Implementation of the ``atm_optuna`` sweeper (see the package docstring for the user contract).

Kept out of Hydra's plugin scan (leading underscore) so that Optuna and SQLAlchemy are imported
only when a sweep actually runs.
"""

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    IntervalSweep,
    Override,
    Quote,
    QuotedString,
    RangeSweep,
    Transformer,
)
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException, HydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from atm.errors import AtmError

log = logging.getLogger(__name__)


class _GridSampler(optuna.samplers.GridSampler):
    """GridSampler without its end-of-grid ``study.stop()``, which only works inside
    ``Study.optimize``; the sweeper caps the number of trials at the grid size instead."""

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        pass


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": _GridSampler,
}
_TAGS = {"log", "int"}
_INT_LITERAL = re.compile(r"[+-]?\d[\d_]*")
_INTERVAL_ENDS = re.compile(r"interval\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)")


class SweepError(AtmError, CompactHydraException):
    """An :class:`AtmError` that Hydra prints as its one-line message (no traceback)."""


@dataclass
class Param:
    """One search-space dimension: Optuna ``name``, override ``key`` (with +/++ prefix)."""

    origin: str  # where it was defined, for error messages
    name: str
    key: str
    distribution: BaseDistribution
    choice_strings: Optional[List[str]] = None  # categorical: override text of each choice

    def override(self, value: Any) -> str:
        if isinstance(self.distribution, CategoricalDistribution):
            choices = self.distribution.choices
            same = [i for i, c in enumerate(choices) if type(c) is type(value) and c == value]
            idx = same[0] if same else choices.index(value)
            assert self.choice_strings is not None
            return f"{self.key}={self.choice_strings[idx]}"
        return f"{self.key}={value!r}"

    def probe_value(self, i: int) -> Any:
        """A legal value for composition checks; over ``i`` it visits every choice."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return d.choices[i % len(d.choices)]
        return d.low if i % 2 == 0 else d.high

    def grid_values(self) -> List[Any]:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return list(d.choices)
        if isinstance(d, IntDistribution) and not d.log:
            return list(range(d.low, d.high + 1, d.step))
        raise SweepError(
            f"{self.origin}: the grid sampler needs choice() or range(), not a continuous interval"
        )


# ----------------------------------------------------------------------------- search space


def _choice_param(origin: str, name: str, key: str, values: Sequence[Any]) -> Param:
    choices: List[Any] = []
    strings: List[str] = []
    for v in values:
        strings.append(Transformer.str(v))
        if isinstance(v, QuotedString):
            v = v.text
        elif not (v is None or isinstance(v, (str, int, float, bool))):
            v = Transformer.str(v)  # lists / dicts: Optuna stores their override text
        choices.append(v)
    if not choices:
        raise ValueError("empty choice")
    return Param(origin, name, key, CategoricalDistribution(choices), strings)


def _param_from_override(override: Override, origin: str) -> Param:
    """Map one sweep override to an Optuna distribution; raises SweepError naming ``origin``."""
    name = override.key_or_group + (f"@{override.package}" if override.package else "")
    key = override.get_key_element()
    value = override.value()
    tags = set(getattr(value, "tags", set()) or set())
    try:
        unknown = tags - _TAGS
        if unknown:
            raise ValueError(f"unknown tag {sorted(unknown)[0]!r} (supported: log, int)")
        if override.is_choice_sweep():
            if tags:
                raise ValueError("tags are not supported on choice()")
            return _choice_param(origin, name, key, list(override.sweep_iterator()))
        if override.is_range_sweep():
            assert isinstance(value, RangeSweep)
            values = list(value.range())
            if not values:
                raise ValueError("empty range")
            ints = all(isinstance(v, int) for v in (value.start, value.stop, value.step))
            if not ints:
                if tags:
                    raise ValueError("tags need an integer range()")
                return _choice_param(origin, name, key, [float(f"{v:.12g}") for v in values])
            step = abs(int(value.step))
            if "log" in tags and step != 1:
                raise ValueError("tag(log, range(...)) needs step 1")
            dist = IntDistribution(min(values), max(values), log="log" in tags, step=step)
            return Param(origin, name, key, dist)
        if override.is_interval_sweep():
            assert isinstance(value, IntervalSweep)
            low, high = value.start, value.end
            assert low is not None and high is not None
            if low > high:
                raise ValueError(f"low {low:g} > high {high:g}")
            if "log" in tags and low <= 0:
                raise ValueError(f"log scale needs low > 0, got {low:g}")
            ends = _INTERVAL_ENDS.search(override.get_value_string())
            written_int = bool(ends) and all(_INT_LITERAL.fullmatch(e) for e in ends.groups())
            if "int" in tags or written_int:
                if low != int(low) or high != int(high):
                    raise ValueError("tag(int, interval(...)) needs integer ends")
                dist = IntDistribution(int(low), int(high), log="log" in tags)
            else:
                dist = FloatDistribution(low, high, log="log" in tags)
            return Param(origin, name, key, dist)
    except (ValueError, TypeError, ArithmeticError, HydraException) as e:
        raise SweepError(f"{origin}: {e} in {override.get_value_string()!r}") from None
    raise SweepError(f"{origin}: unsupported sweep {override.get_value_string()!r}")


def parse_search_space(
    entries: Sequence[Tuple[str, str]], parser: OverridesParser
) -> Tuple[Dict[str, Param], Dict[str, str]]:
    """Parse ``(origin, "key=value")`` entries into (search space, fixed overrides), by name.

    Later entries replace earlier ones with the same key, so command-line entries (given after
    the ``params`` entries) win.
    """
    space: Dict[str, Param] = {}
    fixed: Dict[str, str] = {}
    for origin, line in entries:
        try:
            override = parser.parse_override(line)
        except Exception as e:
            raise SweepError(f"{origin}: cannot parse {line!r}: {e}") from None
        name = override.key_or_group + (f"@{override.package}" if override.package else "")
        space.pop(name, None)
        fixed.pop(name, None)
        if override.is_sweep_override():
            space[name] = _param_from_override(override, origin)
        else:
            fixed[name] = override.input_line or line
    return space, fixed


# ----------------------------------------------------------------------------- helpers


def _quote(text: str) -> str:
    return QuotedString(text=text, quote=Quote.single).with_quotes()


def _normalize_storage(url: Optional[str]) -> Optional[str]:
    """Absolute SQLite paths (relative ones are taken from the launch directory)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as e:
        raise SweepError(f"hydra.sweeper.storage: bad URL {url!r}: {e}") from None
    db = parsed.database
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and not os.path.isabs(db):
        parsed = parsed.set(database=os.path.abspath(db))
    return parsed.render_as_string(hide_password=False)


def _safe_url(url: Optional[str]) -> str:
    if url is None:
        return "in-memory"
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


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


# ----------------------------------------------------------------------------- sweeper


class AtmOptunaSweeperImpl:
    def __init__(
        self,
        study_name: Optional[str] = None,
        storage: Optional[str] = "sqlite:///optuna.db",
        direction: Any = "minimize",
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: Any = None,
        params: Any = None,
        load_if_exists: bool = True,
    ) -> None:
        def plain(x: Any) -> Any:
            return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x

        self.study_name = study_name
        self.storage = storage
        self.direction = plain(direction)
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.sampler_spec: Dict[str, Any] = dict(plain(sampler) or {})
        self.params: Dict[str, Any] = dict(plain(params) or {})
        self.load_if_exists = load_if_exists

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # -- validation (everything here runs before any job) ----------------------------------

    def _directions(self) -> List[str]:
        d = self.direction
        dirs = [d] if isinstance(d, str) else list(d) if isinstance(d, (list, tuple)) else []
        if not dirs or any(x not in ("minimize", "maximize") for x in dirs):
            raise SweepError(
                f"hydra.sweeper.direction: expected minimize, maximize or a list of them, got {d!r}"
            )
        return dirs

    def _make_sampler(self, space: Dict[str, Param], seed_offset: int) -> Any:
        spec = dict(self.sampler_spec)
        name = spec.pop("name", "tpe")
        seed = spec.pop("seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise SweepError(f"hydra.sweeper.sampler.seed: expected an int or null, got {seed!r}")
        seed = None if seed is None else seed + seed_offset
        try:
            if name == "grid":
                grid = {p.name: p.grid_values() for p in space.values()}
                return SAMPLERS[name](grid, seed=seed, **spec)
            return SAMPLERS[name](seed=seed, **spec)
        except (TypeError, ValueError) as e:
            raise SweepError(f"hydra.sweeper.sampler: {e}") from None

    def _check_composition(
        self, space: Dict[str, Param], fixed: List[str], url: Optional[str], name: str
    ) -> None:
        """Compose the app config with every choice of every param (catches bad keys/options)."""
        sizes = [len(getattr(p.distribution, "choices", ())) for p in space.values()]
        rows = max(sizes + [2])
        for i in range(rows):
            overrides = fixed + [p.override(p.probe_value(i)) for p in space.values()]
            overrides += self._trial_overrides(name, url, 0)
            try:
                self.hydra_context.config_loader.load_sweep_config(
                    master_config=self.config, sweep_overrides=overrides
                )
            except Exception as e:
                raise SweepError(
                    f"hydra.sweeper.params: overrides do not compose with the app config: {e}"
                ) from None

    def _open_study(self, url: Optional[str], name: str, directions: List[str]) -> optuna.Study:
        try:
            storage = None if url is None else optuna.storages.RDBStorage(url)
        except Exception as e:
            why = _first_line(e)
            cause = e.__cause__
            if cause is not None and str(cause).strip().split("\n")[0] not in why:
                why += f" ({_first_line(cause)})"
            where = _safe_url(url)
            raise SweepError(f"hydra.sweeper.storage: cannot open {where}: {why}") from None
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=name,
                directions=directions,
                load_if_exists=self.load_if_exists,
            )
        except optuna.exceptions.DuplicatedStudyError:
            raise SweepError(
                f"hydra.sweeper.study_name: study {name!r} already exists in {_safe_url(url)}"
                " (set load_if_exists: true to resume it)"
            ) from None
        have = [d.name.lower() for d in study.directions]
        if have != directions:
            raise SweepError(
                f"hydra.sweeper.direction: study {name!r} exists with directions {have},"
                f" config says {directions}"
            )
        return study

    @staticmethod
    def _trial_overrides(name: str, url: Optional[str], number: int) -> List[str]:
        storage = "null" if url is None else _quote(url)
        return [
            f"++optuna.study_name={_quote(name)}",
            f"++optuna.storage={storage}",
            f"++optuna.trial_number={number}",
        ]

    # -- the sweep -------------------------------------------------------------------------

    def sweep(self, arguments: List[str]) -> List[Sequence[JobReturn]]:
        """Validate everything, then ask/launch/tell until the study has ``n_trials`` finished.

        Raises SweepError (an AtmError) on a bad config before any job runs, and after the
        sweep if every trial of this run failed.
        """
        directions = self._directions()
        for key in ("n_trials", "n_jobs"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SweepError(f"hydra.sweeper.{key}: expected an int >= 1, got {v!r}")
        sampler_name = self.sampler_spec.get("name", "tpe")
        if not isinstance(sampler_name, str) or sampler_name not in SAMPLERS:
            raise SweepError(
                f"hydra.sweeper.sampler.name: unknown sampler {sampler_name!r}"
                f" (choose from {', '.join(SAMPLERS)})"
            )

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        entries = [(f"hydra.sweeper.params.{k}", f"{k}={v}") for k, v in self.params.items()]
        entries += [(f"command-line override {a!r}", a) for a in arguments]
        space, fixed_by_name = parse_search_space(entries, parser)
        fixed = list(fixed_by_name.values())
        if not space:
            log.warning("empty search space: jobs must suggest params through trial_from_config")

        name = self.study_name or str(self.config.hydra.job.name)
        url = _normalize_storage(self.storage)
        self._make_sampler(space, 0)  # validate kwargs / grid space before touching storage
        self._check_composition(space, fixed, url, name)
        study = self._open_study(url, name, directions)
        study.sampler = self._make_sampler(space, len(study.get_trials(deepcopy=False)))

        target = self.n_trials
        if sampler_name == "grid":
            target = min(target, math.prod(len(p.grid_values()) for p in space.values()))
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        finished = len(study.get_trials(deepcopy=False, states=done))
        remaining = max(0, target - finished)
        log.info(
            f"Optuna study {name!r} in {_safe_url(url)}: {finished} finished trial(s), "
            f"running {remaining} more (n_trials={self.n_trials}, sampler={sampler_name})"
        )

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        distributions = {p.name: p.distribution for p in space.values()}

        returns: List[Sequence[JobReturn]] = []
        n_ok, n_failed, first_error = 0, 0, ""
        while remaining > 0:
            trials = [study.ask(distributions) for _ in range(min(self.n_jobs, remaining))]
            batch = [
                fixed
                + [p.override(t.params[p.name]) for p in space.values()]
                + self._trial_overrides(name, url, t.number)
                for t in trials
            ]
            try:
                results = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            except BaseException:
                for t in trials:
                    study.tell(t, state=TrialState.FAIL, skip_if_finished=True)
                raise
            for trial, result in zip(trials, results):
                error = self._tell(study, trial, result, len(directions))
                if error:
                    n_failed += 1
                    first_error = first_error or f"trial #{trial.number}: {error}"
                else:
                    n_ok += 1
            remaining -= len(trials)
            returns.append(results)

        self._report(study, sweep_dir, name, url)
        if n_failed and not n_ok:
            raise SweepError(f"all {n_failed} trial(s) of this sweep failed; first: {first_error}")
        return returns

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
            "storage": _safe_url(url),
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
