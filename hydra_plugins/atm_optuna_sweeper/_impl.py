"""Implementation of the ``atm_optuna`` sweeper (see the package docstring for the user contract).

Kept out of Hydra's plugin scan (leading underscore) so that Optuna and SQLAlchemy are imported
only when a sweep actually runs.
"""

import importlib
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

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
from atm.sweeps.locks import storage_lock

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
PRUNERS = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
}
# Study user attribute holding the pruner spec, read by jobs (trial_from_config, atm.sweeps).
PRUNER_ATTR = "atm_optuna.pruner"
# Trial user attribute: which worker (host:pid) runs the trial.
WORKER_ATTR = "worker"
_TAGS = {"log", "int"}
_INT_LITERAL = re.compile(r"[+-]?\d[\d_]*")
_INTERVAL_ENDS = re.compile(r"interval\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)")
_PREFIX = re.compile(r"^\+{1,2}")
_CONDITIONAL_KEYS = ("when", "space")


class SweepError(AtmError, CompactHydraException):
    """An :class:`AtmError` that Hydra prints as its one-line message (no traceback)."""


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v).strip()


def same_value(a: Any, b: Any) -> bool:
    """Condition matching: numerically if both read as numbers (``1`` == ``1.0`` == ``"1"``),
    else as text (``true``/``false``/``null`` spelled as in YAML)."""
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return _text(a) == _text(b)


@dataclass
class Param:
    """One search-space dimension: Optuna ``name``, override ``key`` (with +/++ prefix)."""

    origin: str  # where it was defined, for error messages
    name: str
    key: str
    distribution: BaseDistribution
    choice_strings: Optional[List[str]] = None  # categorical: override text of each choice
    # condition (define-by-run): param name -> accepted values; all names must match
    when: Dict[str, List[Any]] = field(default_factory=dict)
    when_origin: str = ""  # where the `when` was written (params entry), for error messages

    def override(self, value: Any) -> str:
        if isinstance(self.distribution, CategoricalDistribution):
            choices = self.distribution.choices
            same = [i for i, c in enumerate(choices) if type(c) is type(value) and c == value]
            idx = same[0] if same else choices.index(value)
            assert self.choice_strings is not None
            return f"{self.key}={self.choice_strings[idx]}"
        return f"{self.key}={value!r}"

    def active(self, values: Dict[str, Any]) -> bool:
        """Whether the condition holds for the values sampled so far (by name)."""
        return all(
            k in values and any(same_value(values[k], a) for a in accepted)
            for k, accepted in self.when.items()
        )

    def suggest(self, trial: Any) -> Any:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return trial.suggest_categorical(self.name, d.choices)
        if isinstance(d, IntDistribution):
            return trial.suggest_int(self.name, d.low, d.high, step=d.step, log=d.log)
        assert isinstance(d, FloatDistribution)
        return trial.suggest_float(self.name, d.low, d.high, step=d.step, log=d.log)

    def matching_values(self, accepted: Sequence[Any]) -> List[Any]:
        """The values this param can take that match one of ``accepted`` (for a float interval:
        every numeric ``accepted`` value, unchecked)."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return [c for c in d.choices if any(same_value(c, a) for a in accepted)]
        out: List[Any] = []
        for a in accepted:
            n = _number(a)
            if n is None:
                continue
            if isinstance(d, IntDistribution):
                if n == int(n) and d.low <= n <= d.high and (int(n) - d.low) % d.step == 0:
                    out.append(int(n))
            else:
                out.append(n)
        return out

    def describe(self) -> str:
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            assert self.choice_strings is not None
            return f"choice({', '.join(self.choice_strings)})"
        if isinstance(d, IntDistribution):
            return f"an int in [{d.low}, {d.high}]" + (f" step {d.step}" if d.step != 1 else "")
        return f"a float in [{d.low}, {d.high}]"

    def probe_value(self, i: int) -> Any:
        """A legal value for composition checks; over ``i`` it visits every choice."""
        d = self.distribution
        if isinstance(d, CategoricalDistribution):
            return d.choices[i % len(d.choices)]
        return d.low if i % 2 == 0 else d.high

    def n_probes(self) -> int:
        return max(len(getattr(self.distribution, "choices", ())), 2)

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


Entry = Union[Tuple[str, str], Tuple[str, str, Optional[Dict[str, List[Any]]]]]


def conditional_entry(origin: str, spec: Any) -> Tuple[Any, Dict[str, List[Any]]]:
    """Split a ``{when: {param: value(s)}, space: sweep}`` params entry into (space, condition)."""
    unknown = [k for k in spec if k not in _CONDITIONAL_KEYS]
    if unknown:
        raise SweepError(
            f"{origin}: unknown key {str(unknown[0])!r} (a conditional param takes only"
            " 'when' and 'space')"
        )
    if "space" not in spec:
        raise SweepError(f"{origin}: a conditional param needs a 'space' (e.g. interval(0, 1))")
    when = spec.get("when", {})
    if not isinstance(when, dict):
        raise SweepError(f"{origin}.when: expected a mapping param -> value(s), got {when!r}")
    condition: Dict[str, List[Any]] = {}
    for k, v in when.items():
        accepted = list(v) if isinstance(v, (list, tuple)) else [v]
        if not accepted or any(isinstance(a, (dict, list, tuple)) for a in accepted):
            raise SweepError(
                f"{origin}.when.{k}: expected a value or a non-empty list of values, got {v!r}"
            )
        condition[_PREFIX.sub("", str(k))] = accepted
    return spec["space"], condition


def parse_search_space(
    entries: Sequence[Entry], parser: OverridesParser
) -> Tuple[Dict[str, Param], Dict[str, str]]:
    """Parse ``(origin, "key=value"[, when])`` entries into (search space, fixed overrides),
    by name (the key without its +/++ prefix), in the order first written.

    Later entries replace earlier ones with the same key (keeping their position), so
    command-line entries (given after the ``params`` entries) win; a sweep without ``when``
    that replaces a conditional param keeps its condition.
    """
    items: Dict[str, Union[Param, str]] = {}
    for entry in entries:
        origin, line = entry[0], entry[1]
        when = entry[2] if len(entry) > 2 else None  # type: ignore[misc]
        try:
            override = parser.parse_override(line)
        except Exception as e:
            raise SweepError(f"{origin}: cannot parse {line!r}: {e}") from None
        name = override.key_or_group + (f"@{override.package}" if override.package else "")
        old = items.get(name)
        if override.is_sweep_override():
            param = _param_from_override(override, origin)
            if when is not None:
                param.when, param.when_origin = dict(when), origin
            elif isinstance(old, Param):
                param.when, param.when_origin = old.when, old.when_origin
            items[name] = param
        elif when is not None:
            raise SweepError(
                f"{origin}: 'space' must be a sweep (choice, range or interval),"
                f" got {override.get_value_string()!r}"
            )
        else:
            items[name] = override.input_line or line
    space = {n: v for n, v in items.items() if isinstance(v, Param)}
    fixed = {n: v for n, v in items.items() if isinstance(v, str)}
    return space, fixed


def _witness(
    space: Dict[str, Param], goals: List[Tuple[str, List[Any]]], forced: Dict[str, Any]
) -> Optional[Dict[str, Any]]:
    """Values for the params named in ``goals`` (and their own conditions) meeting all goals."""
    if not goals:
        return forced
    (k, accepted), rest = goals[0], goals[1:]
    if k in forced:
        ok = any(same_value(forced[k], a) for a in accepted)
        return _witness(space, rest, forced) if ok else None
    ref = space[k]
    for v in ref.matching_values(accepted):
        found = _witness(space, list(ref.when.items()) + rest, {**forced, k: v})
        if found is not None:
            return found
    return None


def resolve_conditions(
    space: Dict[str, Param], fixed: Dict[str, str], parser: OverridesParser
) -> Dict[str, Param]:
    """Validate every ``when`` and fold conditions on fixed overrides into constants.

    A condition may refer only to params written before it, or to a key given a fixed value
    (e.g. on the command line); a param whose condition can never hold on the fixed values is
    dropped (with a warning). Raises SweepError (naming the param) otherwise.
    """
    names = list(space)
    out: Dict[str, Param] = {}
    for i, (name, p) in enumerate(space.items()):
        where = p.when_origin or p.origin
        when: Dict[str, List[Any]] = {}
        never = ""
        for k, accepted in p.when.items():
            if k == name:
                raise SweepError(f"{where}: 'when' refers to the param itself")
            if k in space:
                if names.index(k) > i:
                    raise SweepError(
                        f"{where}: 'when' refers to {k!r}, which is written after it"
                        " (a condition may only use params written before it)"
                    )
                ref = space[k]
                if not isinstance(ref.distribution, FloatDistribution):
                    bad = [a for a in accepted if not ref.matching_values([a])]
                    if bad:
                        raise SweepError(
                            f"{where}: 'when' {k}: {bad[0]!r} can never hold"
                            f" ({k} is {ref.describe()})"
                        )
                else:
                    log.warning(
                        f"{where}: 'when' on the continuous param {k!r} holds only on an exact"
                        " match"
                    )
                if k not in out:
                    never = never or f"{k!r} is never sampled"
                when[k] = accepted
            elif k in fixed:
                value = parser.parse_override(fixed[k]).value()
                if not any(same_value(value, a) for a in accepted):
                    never = never or f"{k!r} is fixed to {value!r}"
            else:
                raise SweepError(
                    f"{where}: 'when' refers to {k!r}, which is not in hydra.sweeper.params"
                )
        p.when = when
        if never:
            log.warning(f"{where}: never sampled ({never})")
            continue
        if when and _witness(out, list(when.items()), {}) is None:
            raise SweepError(
                f"{where}: 'when' can never hold together with the conditions of"
                f" {', '.join(repr(k) for k in when)}"
            )
        out[name] = p
    return out


def build_search_space(
    params: Dict[str, Any], arguments: Sequence[str], parser: OverridesParser
) -> Tuple[Dict[str, Param], Dict[str, str]]:
    """(search space, fixed overrides) from ``hydra.sweeper.params`` and the command line."""
    entries: List[Entry] = []
    for k, v in params.items():
        origin = f"hydra.sweeper.params.{k}"
        when = None
        if isinstance(v, dict):
            v, when = conditional_entry(origin, v)
        entries.append((origin, f"{k}={v}", when))
    entries += [(f"command-line override {a!r}", a) for a in arguments]
    space, fixed = parse_search_space(entries, parser)
    return resolve_conditions(space, fixed, parser), fixed


def sample(space: Dict[str, Param], trial: Any) -> Dict[str, Any]:
    """Suggest the params in order, skipping those whose condition is false."""
    values: Dict[str, Any] = {}
    for p in space.values():
        if p.active(values):
            values[p.name] = p.suggest(trial)
    return values


def probe_assignments(space: Dict[str, Param]) -> List[Dict[str, Any]]:
    """Value sets for composition checks: every choice of every param, conditional params
    with their condition made true."""

    def assign(i: int, forced: Dict[str, Any]) -> Dict[str, Any]:
        values: Dict[str, Any] = {}
        for p in space.values():
            if p.active(values):
                values[p.name] = forced[p.name] if p.name in forced else p.probe_value(i)
        return values

    rows = [assign(i, {}) for i in range(max([p.n_probes() for p in space.values()] + [2]))]
    for p in space.values():
        if p.when:
            w = _witness(space, list(p.when.items()), {})
            assert w is not None  # checked by resolve_conditions
            rows += [assign(i, {**w, p.name: p.probe_value(i)}) for i in range(p.n_probes())]
    return rows


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


def make_pruner(spec: Any) -> Tuple[optuna.pruners.BasePruner, int]:
    """(Optuna pruner, report_every) from ``{name: ..., report_every: N, **pruner kwargs}``.

    Raises SweepError naming ``hydra.sweeper.pruner`` for an unknown name or bad kwargs."""
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


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat:
    """Records a heartbeat every ``interval`` seconds for the trials this worker runs (Optuna's
    heartbeat is driven by ``study.optimize``; the ask/tell sweeper drives it itself)."""

    def __init__(self, storage: Any, interval: int) -> None:
        self.storage, self.interval = storage, interval
        self.ids: set = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                ids = list(self.ids)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as e:  # a lost connection must not kill the sweep
                    log.warning(f"heartbeat of trial id {trial_id} failed: {_first_line(e)}")

    def add(self, trial_ids: Sequence[int]) -> None:
        with self.lock:
            self.ids.update(trial_ids)

    def discard(self, trial_ids: Sequence[int]) -> None:
        with self.lock:
            self.ids.difference_update(trial_ids)

    def stop(self) -> None:
        self.stopped.set()


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
        pruner: Any = None,
        objectives: Any = None,
        heartbeat_interval: Optional[int] = 10,
        grace_period: Optional[int] = 30,
        max_retry: Optional[int] = 2,
        report: Optional[str] = "atm.sweeps.report:report",
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
        self.pruner_spec: Dict[str, Any] = dict(plain(pruner) or {"name": "none"})
        self.objectives = plain(objectives)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.max_retry = max_retry
        self.report = report

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
                cond = [p for p in space.values() if p.when]
                if cond:
                    raise SweepError(
                        "hydra.sweeper.sampler.name: the grid sampler does not support"
                        f" conditional params ({cond[0].when_origin} has 'when')"
                    )
                grid = {p.name: p.grid_values() for p in space.values()}
                return SAMPLERS[name](grid, seed=seed, **spec)
            return SAMPLERS[name](seed=seed, **spec)
        except (TypeError, ValueError) as e:
            raise SweepError(f"hydra.sweeper.sampler: {e}") from None

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

    def _retry_callback(self) -> Optional[Any]:
        if self.max_retry is not None and self.max_retry == 0:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)

    def _open_study(self, url: Optional[str], name: str, directions: List[str]) -> optuna.Study:
        heartbeat: Dict[str, Any] = {}
        if url is not None and self.heartbeat_interval:
            heartbeat = dict(
                heartbeat_interval=self.heartbeat_interval,
                grace_period=self.grace_period,
                heartbeat_stale_trial_callback=self._retry_callback(),
            )
        try:
            # one worker at a time creates the tables of a fresh database (several start together); a client
            # outside the sweeper (optuna-dashboard, a script) may still race on them: retry a few times
            for attempt in range(5):
                try:
                    with warnings.catch_warnings(), storage_lock(url, "atm_optuna/init"):
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        storage = None if url is None else optuna.storages.RDBStorage(url, **heartbeat)
                    break
                except Exception as e:
                    if attempt == 4 or "IntegrityError" not in f"{type(e).__name__} {e} {e.__cause__}":
                        raise
                    time.sleep(0.5 * (attempt + 1))
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

    def _trial_overrides(self, name: str, url: Optional[str], number: int) -> List[str]:
        storage = "null" if url is None else _quote(url)
        out = [
            f"++optuna.study_name={_quote(name)}",
            f"++optuna.storage={storage}",
            f"++optuna.trial_number={number}",
        ]
        if self.objectives:
            out.append(f"++optuna.objectives=[{','.join(_quote(str(o)) for o in self.objectives)}]")
        return out

    def _validate(self, directions: List[str]) -> None:
        for key in ("n_trials", "n_jobs"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SweepError(f"hydra.sweeper.{key}: expected an int >= 1, got {v!r}")
        for key in ("heartbeat_interval", "grace_period", "max_retry"):
            v = getattr(self, key)
            low = 0 if key == "max_retry" else 1
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise SweepError(f"hydra.sweeper.{key}: expected an int >= {low} or null, got {v!r}")
        if self.heartbeat_interval and self.grace_period and self.grace_period <= self.heartbeat_interval:
            raise SweepError(
                f"hydra.sweeper.grace_period: {self.grace_period} s must exceed heartbeat_interval"
                f" ({self.heartbeat_interval} s)"
            )
        sampler_name = self.sampler_spec.get("name", "tpe")
        if not isinstance(sampler_name, str) or sampler_name not in SAMPLERS:
            raise SweepError(
                f"hydra.sweeper.sampler.name: unknown sampler {sampler_name!r}"
                f" (choose from {', '.join(SAMPLERS)})"
            )
        pruner, _ = make_pruner(self.pruner_spec)
        if len(directions) > 1 and not isinstance(pruner, optuna.pruners.NopPruner):
            raise SweepError(
                "hydra.sweeper.pruner: Optuna prunes single-objective studies only"
                f" (direction has {len(directions)} entries)"
            )
        objs = self.objectives
        if objs is not None:
            if not isinstance(objs, list) or not all(isinstance(o, str) and o for o in objs):
                raise SweepError(f"hydra.sweeper.objectives: expected a list of metric names, got {objs!r}")
            if len(objs) != len(directions):
                raise SweepError(
                    f"hydra.sweeper.objectives: {len(objs)} metric(s) for {len(directions)}"
                    f" direction(s) {directions}"
                )
        if self.report is not None and ":" not in str(self.report):
            raise SweepError(f"hydra.sweeper.report: expected 'module:function' or null, got {self.report!r}")

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
        sampler_name = self.sampler_spec.get("name", "tpe")

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space, fixed_by_name = build_search_space(self.params, arguments, parser)
        fixed = list(fixed_by_name.values())
        if not space:
            log.warning("empty search space: jobs must suggest params through trial_from_config")

        name = self.study_name or str(self.config.hydra.job.name)
        url = _normalize_storage(self.storage)
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
            f"Optuna study {name!r} in {_safe_url(url)}: {finished} finished trial(s), "
            f"running {remaining} more (n_trials={self.n_trials}, sampler={sampler_name})"
        )

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        heart = None
        if url is not None and self.heartbeat_interval:
            heart = _Heartbeat(study._storage, self.heartbeat_interval)
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
                    self._interrupted(study, trials, retry=url is not None)
                    raise
                finally:
                    if heart is not None:
                        heart.discard([t._trial_id for t in trials])
                for trial, result in zip(trials, results):
                    error = self._tell(study, trial, result, len(directions))
                    if error:
                        n_failed += 1
                        first_error = first_error or f"trial #{trial.number}: {error}"
                    else:
                        n_ok += 1
                remaining -= len(trials)
                returns.append(results)
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
        heart: Optional[_Heartbeat],
    ) -> List[optuna.Trial]:
        """Up to ``limit`` trials within the global budget: first the WAITING ones (retries of
        failed or interrupted trials, enqueued trials), then new ones while COMPLETE + PRUNED +
        RUNNING + WAITING < ``target``. Stale trials (dead workers) are failed first. Counting
        and asking happen under one lock, so that concurrent workers never exceed the budget."""
        with storage_lock(url, f"atm_optuna/budget/{name}"), warnings.catch_warnings():
            # Optuna warns that its heartbeat is meant for study.optimize: this loop drives it itself
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
            n_waiting = sum(t.state == TrialState.WAITING for t in trials)
            n_live = sum(t.state in live for t in trials)
            n = min(limit, n_waiting + max(0, target - n_live))
            asked = []
            for i in range(n):
                # seeded by the number of trials so far: reproducible for one worker, and two
                # workers never sample with the same seed (the grid sampler keeps its instance: it
                # picks unvisited grid points itself)
                if self.sampler_spec.get("name", "tpe") != "grid":
                    study.sampler = self._make_sampler(space, len(trials) + i)
                trial = study.ask()
                trial.set_user_attr(WORKER_ATTR, _worker())
                if getattr(study._storage, "get_heartbeat_interval", lambda: None)():
                    study._storage.record_heartbeat(trial._trial_id)  # stale from now on unless renewed
                if heart is not None:
                    heart.add([trial._trial_id])
                asked.append(trial)
            return asked

    def _interrupted(self, study: optuna.Study, trials: Sequence[optuna.Trial], retry: bool) -> None:
        """The launcher raised (Ctrl-C, a dead job process): fail the trials and, as for a dead
        worker, enqueue their retries so that re-running the command continues them."""
        callback = self._retry_callback() if retry else None  # an in-memory study ends with the process
        for t in trials:
            try:
                frozen = study.tell(t, state=TrialState.FAIL, skip_if_finished=True)
                if callback is not None and frozen.state == TrialState.FAIL:
                    callback(study, frozen)
            except Exception as e:  # keep the original exception
                log.warning(f"could not record interrupted trial #{t.number}: {_first_line(e)}")

    def _user_report(self, study: optuna.Study, sweep_dir: Path) -> None:
        if not self.report:
            return
        module, _, function = str(self.report).partition(":")
        try:
            getattr(importlib.import_module(module), function)(
                study=study, sweep_dir=sweep_dir, config=self.config
            )
        except Exception as e:  # the trials are recorded; a failing plot must not fail the sweep
            log.warning(f"hydra.sweeper.report {self.report}: {_first_line(e)}", exc_info=True)

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
