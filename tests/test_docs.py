"""The documentation as a contract: every ``atm.train`` command in README.md and docs/*.md composes as written,
the README stays a front page, and every relative link points at a file (and heading) that exists.

Commands are taken from the fenced code blocks (not ``python`` ones): a logical line (backslash continuations
joined) that runs ``-m atm.train`` / ``--module atm.train`` (``python``, ``torchrun``, ``deepspeed``). Shell
variables assigned in the same block (``SMALL="..."``, ``for i in ...``) are expanded; placeholders are
substituted: ``<stage>`` and ``<name>`` by a real stage and sweep (:data:`PLACEHOLDERS`), any other ``<...>``
(run ids, hosts, passwords) by a plain word; a bare ``...`` (more overrides) is dropped. Each command is then
dry-run as Hydra allows it, ``atm.train <args> --cfg job --resolve`` (composed, interpolations resolved, nothing
trained): Hydra accepts only one of ``--multirun``/``--cfg``, so a multirun line is composed without ``-m`` (the
sweeper never starts a trial).

Speed: importing the stage registry (every stage module: torch, transformers) costs seconds per interpreter, so
the commands run as forked children of one driver (:mod:`tests.cli_driver`), each exactly as ``python -m
atm.train`` would (its own argv, exit status and output). One command (the README's sweep) also runs as a
plain ``python -m atm.train`` subprocess, and must print the same config as its forked twin.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli_driver import Job, run_forked, run_plain

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 12_000
#: Placeholders whose value matters to the composition; any other ``<...>`` becomes a plain word.
PLACEHOLDERS = {"stage": "pretrain_stage1", "name": "distill_losses"}

_FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_PLACEHOLDER = re.compile(r"<([^<>\n]+)>")
_CONTROL = re.compile(r"^[;&|]+$")


# --------------------------------------------------------------------------------------------- markdown


def _closes(line: str, fence: str) -> bool:
    """Whether ``line`` closes a code block opened by ``fence``: the fence character only, at least as many."""
    stripped = line.strip()
    return stripped.startswith(fence) and not stripped.strip(fence[0])


def _blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """Fenced code blocks of a markdown text: ``(info string, line number of the first line, lines)``."""
    blocks, current, fence = [], None, None
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if current is None and match:
            fence, current = match.group(1), (match.group(2).lower(), number + 1, [])
        elif current is not None and _closes(line, fence):
            blocks.append(current)
            current = None
        elif current is not None:
            current[2].append(line)
    return blocks


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (where links and headings are not markup)."""
    kept, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and _closes(line, fence):
            fence = None
        elif fence is None:
            kept.append(line)
    return re.sub(r"`[^`]*`", lambda span: "\n" * span.group().count("\n"), "\n".join(kept))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(path.read_text()).splitlines():
        if match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = _slug(match.group(1))
            anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


# ---------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    args: tuple[str, ...]  # the atm.train arguments, -m/--multirun removed
    multirun: bool

    def __str__(self) -> str:
        flag = " (multirun)" if self.multirun else ""
        return f"{self.where}: atm.train {' '.join(map(shlex.quote, self.args))}{flag}"


def _logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Backslash-continued lines joined: ``(line number, text)``."""
    out, buffer, start = [], "", None
    for offset, line in enumerate(lines):
        start = first + offset if start is None else start
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        out.append((start, buffer + line))
        buffer, start = "", None
    if buffer:
        out.append((start, buffer))
    return out


def _words(line: str) -> list[str]:
    """Shell words of ``line`` (quotes removed, comments dropped; ``;``, ``&``, ``|`` runs as their own words)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    return list(lexer)


def _substitute(line: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1).strip()
        return PLACEHOLDERS.get(name) or re.sub(r"\W+", "_", name).strip("_")

    return _PLACEHOLDER.sub(value, line)


def _expand(words: list[str], variables: dict[str, str], where: str) -> list[str]:
    """Unquoted shell expansion of ``$NAME``/``${NAME}``: a word that is only a variable is word-split."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise AssertionError(f"{where}: shell variable ${name} is not assigned in its code block")
        return variables[name]

    out = []
    for word in words:
        whole = _VARIABLE.fullmatch(word)
        out.extend(_words(value(whole)) if whole else [_VARIABLE.sub(value, word)])
    return out


def commands_of(path: Path) -> list[Command]:
    """The ``atm.train`` commands in the fenced code blocks of ``path``."""
    found = []
    for info, first, lines in _blocks(path.read_text()):
        if info in ("python", "py", "yaml", "yml", "json", "toml"):
            continue
        variables: dict[str, str] = {}
        for number, line in _logical_lines(lines, first):
            where = f"{path.relative_to(REPO)}:{number}"
            words = _words(_substitute(line))
            if words[:1] == ["export"]:
                words = words[1:]
            if words and _ASSIGNMENT.match(words[0]):
                for word in words:
                    if _CONTROL.match(word) or not _ASSIGNMENT.match(word):
                        break
                    name, value = word.split("=", 1)
                    variables[name] = value
                continue
            if words[:1] == ["for"] and len(words) > 3 and words[2] == "in":
                variables[words[1]] = words[3]
            for k in range(len(words) - 1):
                if words[k] in ("-m", "--module") and words[k + 1] == "atm.train":
                    rest = words[k + 2:]
                    end = next((i for i, w in enumerate(rest) if _CONTROL.match(w)), len(rest))
                    args = [w for w in _expand(rest[:end], variables, where) if w != "..."]
                    multirun = any(a in ("-m", "--multirun") for a in args)
                    found.append(Command(where, tuple(a for a in args if a not in ("-m", "--multirun")), multirun))
    return found


def all_commands() -> list[Command]:
    return [command for path in DOCS for command in commands_of(path)]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR"):  # the default store; Hydra's one-paragraph errors
        env.pop(key, None)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])]),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def _dry_run(command: Command) -> list[str]:
    """Compose and print the job config, its interpolations resolved; train nothing."""
    return [*command.args, "--cfg", "job", "--resolve"]


@pytest.fixture(scope="module")
def commands() -> list[Command]:
    return all_commands()


def test_commands_are_found(commands):
    """The extraction itself: the README's CLI forms and the docs' commands are there, placeholders filled in."""
    readme = [c for c in commands if c.where.startswith("README.md")]
    assert len(readme) >= 5 and len(commands) >= 25, "\n".join(map(str, commands))
    assert any(c.multirun and "+sweep=distill_losses" in c.args for c in readme)
    assert any("stage=pretrain_stage1" in c.args for c in readme)  # stage=<stage>
    small = [c for c in commands if "+sweep=autodistiller_massive" in c.args]
    assert small and all("trainer.max_steps=60" in c.args for c in small)  # $SMALL expanded
    assert not [c for c in commands if any(re.search(r"[<>$]", a) for a in c.args)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks one child per command")
def test_every_documented_command_composes(commands, tmp_path):
    """``atm.train <args> --cfg job --resolve`` succeeds for each documented command (exit 0, a config printed)."""
    work = tmp_path / "work"  # the children's working directory: nothing may land in the repository
    work.mkdir()
    jobs = [Job(_dry_run(c), str(work)) for c in commands]
    # one command also as a plain subprocess: the README's sweep
    twin = next(i for i, c in enumerate(commands) if c.multirun)
    plain = run_plain(jobs[twin], _env(), timeout=600)
    results = run_forked(jobs, tmp_path / "out", _env(), timeout=600)
    failed = [f"{c}\n  exit {r.returncode}: {r.stderr.strip()[-1500:]}"
              for c, r in zip(commands, results) if r.returncode != 0 or "stage:" not in r.stdout]
    assert not failed, "documented commands that do not compose:\n" + "\n".join(failed)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert plain.stdout == results[twin].stdout  # the forked run is the plain `python -m atm.train` run
    assert not list(work.iterdir())  # a dry run writes nothing


def test_readme_is_a_front_page():
    size = len((REPO / "README.md").read_text())
    assert size <= README_LIMIT, f"README.md has {size:,} characters (at most {README_LIMIT:,}): move detail into docs/"


def test_every_relative_link_resolves():
    broken = []
    for path in DOCS:
        text = _prose(path.read_text())
        targets = re.findall(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
        targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)
        for target in targets:
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{path.relative_to(REPO)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{path.relative_to(REPO)}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)
