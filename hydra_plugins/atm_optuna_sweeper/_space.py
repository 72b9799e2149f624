"""The search-space language of the ``atm_optuna`` sweeper: sweep strings and conditional params -> Optuna.

:func:`build_search_space` turns ``hydra.sweeper.params`` and the command line into an ordered search space
(name -> :class:`Param`) and the fixed overrides; :func:`sample` suggests a trial's values (define-by-run:
a param whose ``when`` is false is skipped); :func:`probe_assignments` lists the value sets of the pre-flight
composition check. The syntax is described in the package docstring. Every error is a
:class:`~atm.sweeps.pruners.SweepError` naming the ``params`` entry or command-line override at fault.
"""

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    IntervalSweep,
    Override,
    QuotedString,
    RangeSweep,
    Transformer,
)
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from atm.sweeps.pruners import SweepError

log = logging.getLogger(__name__)

_TAGS = {"log", "int"}
_INT_LITERAL = re.compile(r"[+-]?\d[\d_]*")
_INTERVAL_ENDS = re.compile(r"interval\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)")
_PREFIX = re.compile(r"^\+{1,2}")
_CONDITIONAL_KEYS = ("when", "space")


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
