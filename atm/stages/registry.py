"""The stage registry: every stage declares itself with :func:`stage` on its ``run`` function.

A stage is one module + one config file (``conf/stage/<name>.yaml``)::

    @stage("word_count", reads=("data",), artifact="evaluation", check=check, aliases=("wc",))
    def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
        ...

Discovery: the built-in stages are every module of the :mod:`atm.stages` package, imported (with
:mod:`pkgutil`) on the first read of the registry; modules that declare no stage (``common``, ``registry``)
simply register nothing. A stage module outside atm is named by its config, ``stage.module: mypkg.my_stage``;
:func:`stage_of` imports it before looking the stage up (``atm.train`` and :mod:`atm.lineage` read stages
through it).

Listings (:func:`all_stages`, :func:`stages_of_kind`, error messages) are in registration order, whatever
imported a stage module first: the built-in stages in pipeline order (their modules by
:data:`_PIPELINE_ORDER`, any other module of the package after them by name; within a module, in the order
it declares them), then stages declared outside the package in the order they were registered.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from omegaconf import DictConfig

from atm.errors import AtmError

#: What consumers of a stage's runs download: its artifact directory.
ARTIFACTS = ("checkpoint", "tokenizer", "evaluation")
#: The built-in stage modules in pipeline order (tokenizer -> pretraining -> distillation -> task stages ->
#: evaluation): the order of listings.
_PIPELINE_ORDER = ("tokenizer", "pretrain", "distill", "finetune", "distill_task", "finetune_xnli", "evaluate")

StageFn = Callable[[DictConfig, dict], "dict[str, float]"]


@dataclass(frozen=True)
class Stage:
    """A registered stage.

    Attributes:
        name: the value of ``stage=`` on the command line (and of ``stage.name`` in its config).
        run: ``run(cfg, inputs) -> metrics``, called inside the stage's MLflow run; it logs its metrics and
            artifacts and returns the final metrics, which contain ``cfg.stage.objective``.
        reads: the top-level config groups that define what it trains (they enter its config hash).
        artifact: the artifact directory consumers download (:data:`ARTIFACTS`).
        check: optional ``check(cfg)`` validating the config before any input is resolved or trained
            (raises AtmError naming the key).
        aliases: short names accepted wherever a stage is referenced (``teacher=stage2``).
        check_inputs: optional ``check_inputs(cfg, models)`` validating the config against its inputs' model
            configs (``models``: role -> the input's model config as a mapping with ``num_hidden_layers``, ...,
            or None when unknown) in lineage's dry pass, before any input is trained (raises AtmError).
        kinds: what the stage produces, for code that picks stages by role: ``mlm`` (an MLM encoder),
            ``teacher`` (a pretraining teacher), ``classifier:<task>`` (a fine-tuned task model).
        module: the module that declared it.
    """

    name: str
    run: StageFn
    reads: tuple[str, ...]
    artifact: str = "checkpoint"
    check: Callable[[DictConfig], None] | None = None
    aliases: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    module: str = ""
    check_inputs: Callable[[DictConfig, dict], None] | None = None

    def hashed_keys(self, cfg: DictConfig) -> tuple[str, ...]:
        """The top-level config keys of a run of ``cfg`` that enter its config hash: ``stage``, ``seed``, the
        groups it reads and its input roles."""
        return ("stage", "seed", *self.reads, *cfg.stage.inputs, *cfg.stage.get("optional_inputs", []))

    def validate(self, cfg: DictConfig) -> None:
        """Run the stage's config check, if it has one (raises AtmError)."""
        if self.check is not None:
            self.check(cfg)


class Registry:
    """Stages by name and their aliases; :meth:`ordered` lists them in registration order (see the module doc)."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}
        self.aliases: dict[str, str] = {}

    def add(self, entry: Stage) -> None:
        """Register ``entry``. Declaring the same function again (a module imported twice) replaces it.

        Raises:
            AtmError: the name or one of its aliases is already a stage name or alias of another function.
        """
        old = self.stages.get(entry.name)
        if old is not None and not _same_function(old.run, entry.run):
            raise AtmError(f"stage '{entry.name}' registered twice ({old.module} and {entry.module})")
        for alias in entry.aliases:
            taken = self.aliases.get(alias, alias if alias in self.stages else None)
            if taken is not None and taken != entry.name:
                raise AtmError(f"stage alias '{alias}' of {entry.name} is already taken by stage {taken}")
        if entry.name in self.aliases and self.aliases[entry.name] != entry.name:
            raise AtmError(f"stage '{entry.name}' is already an alias of stage {self.aliases[entry.name]}")
        self.stages[entry.name] = entry
        self.aliases.update({alias: entry.name for alias in entry.aliases})

    def ordered(self) -> dict[str, Stage]:
        """The stages by name: built-in ones in pipeline order, then the others as registered."""
        seq = {name: i for i, name in enumerate(self.stages)}
        return {s.name: s for s in sorted(self.stages.values(), key=lambda s: (*_module_rank(s.module), seq[s.name]))}

    def canonical(self, ref: str) -> str:
        return self.aliases.get(ref, ref)

    def get(self, ref: str) -> Stage:
        try:
            return self.stages[self.canonical(ref)]
        except KeyError:
            raise AtmError(f"unknown stage '{ref}' (known: {', '.join(self.ordered())})") from None

    def of_kind(self, kind: str) -> tuple[str, ...]:
        return tuple(name for name, s in self.ordered().items() if kind in s.kinds)


def _module_rank(module: str) -> tuple[int, int, str]:
    """Sort key of a stage module: the built-in ones by :data:`_PIPELINE_ORDER`, then the package's other
    modules by name, then modules outside the package (equal: kept in registration order)."""
    package, _, short = module.rpartition(".")
    if package != __name__.rpartition(".")[0]:
        return (2, 0, "")
    if short in _PIPELINE_ORDER:
        return (0, _PIPELINE_ORDER.index(short), "")
    return (1, 0, short)


def _same_function(a: Callable, b: Callable) -> bool:
    return a is b or (getattr(a, "__module__", None), getattr(a, "__qualname__", None)) == (
        getattr(b, "__module__", None), getattr(b, "__qualname__", None))


_REGISTRY = Registry()
_discovered = False


def stage(*names: str, reads: Sequence[str] = (), artifact: str = "checkpoint",
          check: Callable[[DictConfig], None] | None = None,
          aliases: Sequence[str] | Mapping[str, str] = (), kinds: Sequence[str] = (),
          check_inputs: Callable[[DictConfig, dict], None] | None = None) -> Callable[[StageFn], StageFn]:
    """Decorator: register the decorated ``run(cfg, inputs) -> metrics`` as the stage(s) ``names``.

    One decorator may register several names for the same function (``pretrain_stage1``,
    ``pretrain_stage2``), each a :class:`Stage` with the same attributes. The function is returned unchanged.

    Args:
        names: one or more stage names.
        reads: top-level config groups that define what the stage trains (they enter its config hash).
        artifact: what consumers download, one of :data:`ARTIFACTS`.
        check: optional config-time validation ``check(cfg)`` raising AtmError naming the key.
        aliases: short names of the stage; with several ``names``, a mapping ``{alias: name}``.
        kinds: what the stage produces (``mlm``, ``teacher``, ``classifier:<task>``).
        check_inputs: optional ``check_inputs(cfg, models)`` against the inputs' model configs (see :class:`Stage`).

    Raises:
        AtmError: no name, an unknown ``artifact``, an alias without its stage (several names and no mapping,
            or a mapping to a name not declared here), or a name or alias taken by another stage.
    """
    if not names:
        raise AtmError("@stage needs at least one stage name")
    if artifact not in ARTIFACTS:
        raise AtmError(f"stage {names[0]}: artifact={artifact!r} must be one of {', '.join(ARTIFACTS)}")
    if isinstance(aliases, Mapping):
        alias_of = dict(aliases)
    elif len(names) == 1 or not aliases:
        alias_of = {alias: names[0] for alias in aliases}
    else:
        raise AtmError(f"stages {', '.join(names)}: give aliases as a mapping {{alias: stage name}}")
    for alias, name in alias_of.items():
        if name not in names:
            raise AtmError(f"stage alias '{alias}' names {name!r}, not one of the stages declared: {', '.join(names)}")

    def register(fn: StageFn) -> StageFn:
        for name in names:
            _REGISTRY.add(Stage(name, fn, tuple(reads), artifact, check,
                                tuple(a for a, n in alias_of.items() if n == name), tuple(kinds), fn.__module__,
                                check_inputs))
        return fn

    return register


def _discover() -> None:
    """Import every module of the :mod:`atm.stages` package, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import atm.stages as package

    try:
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{info.name}")
    except BaseException:
        _discovered = False
        raise


def get_stage(name_or_alias: str) -> Stage:
    """The stage called ``name_or_alias`` (a name or an alias).

    Raises:
        AtmError: naming the unknown stage and the known ones.
    """
    _discover()
    return _REGISTRY.get(str(name_or_alias))


def all_stages() -> Mapping[str, Stage]:
    """Every registered stage by name, in registration order (a read-only mapping)."""
    _discover()
    return MappingProxyType(_REGISTRY.ordered())


def canonical_name(ref: str) -> str:
    """The stage name of ``ref`` when it is an alias (``stage2`` -> ``pretrain_stage2``), else ``ref`` itself
    (a stage name, or something that is no stage: test with ``canonical_name(ref) in all_stages()``)."""
    _discover()
    return _REGISTRY.canonical(str(ref))


def stages_of_kind(kind: str) -> tuple[str, ...]:
    """Names of the stages that produce ``kind`` (``mlm``, ``teacher``, ``classifier:massive``, ...), in
    registration order."""
    _discover()
    return _REGISTRY.of_kind(kind)


def import_stage_module(stage_cfg: DictConfig) -> None:
    """Import ``stage_cfg.module`` (the ``stage`` config group) when it is set: a stage module outside atm.

    Raises:
        AtmError: the module cannot be imported.
    """
    module = stage_cfg.get("module") if stage_cfg is not None else None
    if not module:
        return
    try:
        importlib.import_module(str(module))
    except ImportError as err:
        raise AtmError(f"stage.module={module}: cannot import it ({err})") from None


def stage_of(cfg: DictConfig) -> Stage:
    """The stage a composed config runs (``cfg.stage.name``), after importing ``cfg.stage.module`` if set.

    Raises:
        AtmError: the module cannot be imported, or it declares no stage of that name.
    """
    import_stage_module(cfg.stage)
    return get_stage(cfg.stage.name)
