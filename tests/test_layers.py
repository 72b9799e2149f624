"""The layering of atm: stages are leaves over shared layers, and atm imports nothing above it.

* no module of ``atm/stages`` imports another stage module (any form, also inside functions); it may import
  ``atm.stages.common``, ``atm.stages.registry`` (or the package itself) and the layers below (models, probes,
  tasks, data, engine, distill, tracking, ...);
* nothing under ``atm/`` imports ``hydra_plugins`` or ``analysis`` (they sit on top of atm);
* every atm module imports cleanly with no other atm module imported before it (as in a fresh interpreter), so
  no import circle works only thanks to the order in which modules happen to be imported.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ATM = REPO / "atm"
STAGES = ATM / "stages"
#: Modules of atm/stages that every stage may import (they declare no stage of their own).
SHARED = {"atm.stages", "atm.stages.common", "atm.stages.registry"}


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` (a module under ``root``), at any depth (functions,
    classes, ``if`` blocks). ``from package import name`` yields ``package.name`` as well as ``package`` (the
    name may be a submodule); relative imports are resolved against the module's package."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def stage_modules() -> set[str]:
    """Every module of atm/stages but the shared ones."""
    return {_module_name(p) for p in _modules(STAGES)} - SHARED


def test_the_parser_sees_every_form_of_import(tmp_path):
    pkg = tmp_path / "atm" / "stages"
    pkg.mkdir(parents=True)
    source = pkg / "x.py"
    source.write_text("import atm.stages.a\nfrom atm.stages.b import f\nfrom atm.stages import c\nfrom . import d\n"
                      "from .e import g\n\ndef h():\n    from atm.stages.i import j\n    import atm.stages.k as k\n")
    found = {name for _, name in imported_modules(source, tmp_path)}
    assert {f"atm.stages.{m}" for m in "abcdeik"} <= found


def test_stage_modules_are_leaves():
    stages = stage_modules()
    assert {"atm.stages.pretrain", "atm.stages.evaluate", "atm.stages.finetune"} <= stages
    offences = []
    for path in _modules(STAGES):
        name = _module_name(path)
        for line, imported in imported_modules(path):
            if imported in stages and imported != name:
                offences.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
    assert not offences, "a stage module imports another stage module:\n" + "\n".join(offences)


def test_shared_stage_modules_import_no_stage():
    stages = stage_modules()
    offences = [f"{p.relative_to(REPO)}:{line} imports {m}" for p in _modules(STAGES) if _module_name(p) in SHARED
                for line, m in imported_modules(p) if m in stages]
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("above", ["hydra_plugins", "analysis"])
def test_atm_imports_nothing_above_it(above):
    offences = [f"{p.relative_to(REPO)}:{line} imports {m}" for p in _modules(ATM)
                for line, m in imported_modules(p) if m == above or m.startswith(above + ".")]
    assert not offences, f"atm must not import {above}:\n" + "\n".join(offences)


# One interpreter, every atm module imported with no atm module loaded before it (third-party packages stay
# loaded: they import no atm module, and loading torch once keeps this fast). Prints {module: error or null}.
_IMPORT_EACH = """
import importlib, json, sys, traceback
import mlflow, omegaconf, torch, transformers  # noqa: F401  (third-party, loaded once)
results = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "atm" or m.startswith(("atm.", "hydra_plugins", "analysis"))]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
        results[name] = None
    except BaseException:
        results[name] = traceback.format_exc(limit=-3)
print(json.dumps(results))
"""


def _import_each(modules: list[str]) -> dict[str, str | None]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_atm_module_imports_on_its_own():
    modules = sorted({_module_name(p) for p in _modules(ATM)})
    failed = {m: err for m, err in _import_each(modules).items() if err}
    assert not failed, "\n".join(f"{m}:\n{err}" for m, err in failed.items())


def test_stage_modules_import_in_fresh_interpreters():
    """Each stage module (and the shared ones) alone in a new interpreter, all started at once."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for m in sorted(stage_modules() | SHARED)}
    failed = {}
    for module, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        if proc.returncode:
            failed[module] = err[-2000:]
    assert not failed, "\n".join(f"{m}:\n{err}" for m, err in failed.items())
