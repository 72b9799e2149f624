"""MASSIVE 1.1 reader: intents, scenarios and word-level BIO slot tags, read straight from the release archive.

The archive (``massive/amazon-massive-dataset-1.1.tar.gz`` in the mirror layout, fetched with
:func:`atm.data.fetch.fetch`) holds ``1.1/data/<locale>.jsonl``, one record a line with ``id, locale,
partition, scenario, intent, utt, annot_utt`` (``worker_id``, ``slot_method`` and ``judgments`` are
optional and ignored). Slots are written inline in ``annot_utt`` as ``[slot_type : words]``.

Words follow the official MASSIVE preprocessing (``scripts/create_hf_dataset.py`` of alexa/massive):
whitespace tokens of ``annot_utt``, except for the locales without word spacing (ja-JP, zh-CN, zh-TW),
where every non-ASCII chunk is split into characters. The annotation puts spaces around every slot, so
for those locales whitespace tokens of ``annot_utt`` would hand the gold slot boundaries to the model.
"""

from __future__ import annotations

import functools
import re
import tarfile
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atm.data.cache import derived
from atm.data.fetch import fetch
from atm.data.text import FIX_HINT, decode_lines, get_field, iter_jsonl
from atm.errors import AtmError

MASSIVE_ARCHIVE = "massive/amazon-massive-dataset-1.1.tar.gz"
PARTITIONS: tuple[str, ...] = ("train", "dev", "test")
#: Locales written without spaces between words; tokenised into characters (ASCII chunks kept whole).
CHAR_SPLIT_LOCALES: frozenset[str] = frozenset({"ja-JP", "zh-CN", "zh-TW"})
OUTSIDE = "O"

_MEMBER = re.compile(r"1\.1/data/([A-Za-z]{2,3}-[A-Za-z]{2,4})\.jsonl")
_BRACKET = re.compile(r"[\[\]]")
_SLOT_SEPARATOR = " : "


@dataclass(frozen=True, slots=True)
class MassiveExample:
    """One MASSIVE utterance with word-level BIO slot tags (``slot_tags[i]`` tags ``words[i]``)."""

    id: str
    locale: str
    partition: str
    scenario: str
    intent: str
    utt: str
    words: tuple[str, ...]
    slot_tags: tuple[str, ...]


def _tokens(text: str, char_split: bool) -> list[str]:
    """Whitespace tokens; with ``char_split``, non-ASCII tokens are split into characters."""
    if not char_split:
        return text.split()
    return [piece for chunk in text.split() for piece in ([chunk] if chunk.isascii() else list(chunk))]


def parse_annot_utt(
    annot: str, where: str = "<annot_utt>", *, char_split: bool = False
) -> tuple[list[str], list[str]]:
    """Turn an annotated utterance into words and word-level BIO tags.

    ``"wake me up at [time : five am] [date : this week]"`` gives
    ``["wake", "me", "up", "at", "five", "am", "this", "week"]`` and
    ``["O", "O", "O", "O", "B-time", "I-time", "B-date", "I-date"]``. Brackets are word boundaries even
    when they touch text (``"x[date : y]z"`` -> ``x y z``).

    Args:
        annot: the ``annot_utt`` string.
        where: location used in error messages, e.g. ``"<archive>:<member>:<line>"``.
        char_split: split non-ASCII tokens into characters (the official preprocessing of ja-JP, zh-CN
            and zh-TW).

    Raises:
        AtmError: ``"<where>: malformed slot annotation (<why>): <annot>"`` for unbalanced or nested
            brackets, a slot without ``" : "``, an empty or space-containing slot type, or an empty filler.
    """
    words: list[str] = []
    tags: list[str] = []

    def fail(why: str) -> AtmError:
        return AtmError(f"{where}: malformed slot annotation ({why}): {annot!r}")

    in_slot = False
    start = 0
    for match in _BRACKET.finditer(annot):
        chunk = annot[start : match.start()]
        start = match.end()
        if match.group() == "[":
            if in_slot:
                raise fail("nested '['")
            outside = _tokens(chunk, char_split)
            words += outside
            tags += [OUTSIDE] * len(outside)
            in_slot = True
            continue
        if not in_slot:
            raise fail("']' without '['")
        in_slot = False
        slot_type, sep, filler = chunk.partition(_SLOT_SEPARATOR)
        slot_type = slot_type.strip()
        if not sep:
            raise fail(f"slot {chunk!r} has no {_SLOT_SEPARATOR!r}")
        if not slot_type or len(slot_type.split()) != 1:
            raise fail(f"bad slot type {slot_type!r}")
        inside = _tokens(filler, char_split)
        if not inside:
            raise fail(f"slot {slot_type!r} has no words")
        words += inside
        tags += [f"B-{slot_type}"] + [f"I-{slot_type}"] * (len(inside) - 1)
    if in_slot:
        raise fail("unclosed '['")
    outside = _tokens(annot[start:], char_split)
    return words + outside, tags + [OUTSIDE] * len(outside)


def _stamp(path: Path) -> tuple[int, int]:
    """Modification time and size: part of in-process cache keys, so a replaced file is re-read."""
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _archive_locales(path: Path, stamp: tuple[int, int]) -> tuple[str, ...]:
    with tarfile.open(path, "r:gz") as archive:
        return tuple(sorted(m[1] for name in archive.getnames() if (m := _MEMBER.fullmatch(name))))


def _archive() -> Path:
    return fetch(MASSIVE_ARCHIVE)


def massive_locales() -> list[str]:
    """Return the locales present in the MASSIVE archive, sorted (e.g. ``["af-ZA", ..., "zh-TW"]``).

    Raises:
        AtmError: the archive cannot be found (see :func:`atm.data.fetch.fetch`) or is not a tar.gz.
    """
    path = _archive()
    try:
        return list(_archive_locales(path, _stamp(path)))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AtmError(f"{path}: not a readable MASSIVE tar.gz archive ({exc}); {FIX_HINT}") from None


def _check_choice(kind: str, wanted: Collection[str] | None, available: Collection[str]) -> set[str] | None:
    if wanted is None:
        return None
    if isinstance(wanted, str):
        wanted = [wanted]
    for value in wanted:
        if value not in available:
            raise AtmError(f"unknown MASSIVE {kind} {value!r} (available: {', '.join(available)})")
    return set(wanted)


def iter_massive_records(
    locales: Collection[str] | None = None, partitions: Collection[str] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, raw record)`` for the MASSIVE records of the given locales and partitions.

    The cheap path for callers that need only some fields (e.g. ``utt``); :func:`read_massive` builds on
    it. Records come in archive order (locales alphabetically, then file order); ``location`` is
    ``"<archive>:<member>:<line>"``. Only ``locale`` (must match the file) and ``partition`` are checked.

    Args:
        locales: locale codes (a single string is accepted), or None for all.
        partitions: subset of ``("train", "dev", "test")``, or None for all.

    Raises:
        AtmError: unknown locale or partition (``"unknown MASSIVE locale 'xx-YY' (available: ...)"``),
            malformed JSON (``"<archive>:<member>:<line>: malformed JSON ..."``), a record whose
            ``locale`` is missing or differs from its file, or without a string ``partition``.
    """
    wanted_locales = _check_choice("locale", locales, massive_locales())
    wanted_partitions = _check_choice("partition", partitions, PARTITIONS)
    path = _archive()
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                match = _MEMBER.fullmatch(member.name)
                if not (match and member.isfile()):
                    continue
                if wanted_locales is not None and match[1] not in wanted_locales:
                    continue
                with archive.extractfile(member) as fh:
                    name = f"{path}:{member.name}"
                    for loc, record in iter_jsonl(decode_lines(fh, name), name):
                        if get_field(record, "locale", loc) != match[1]:
                            raise AtmError(f"{loc}: record locale {record['locale']!r} does not match its file")
                        partition = get_field(record, "partition", loc)
                        if wanted_partitions is None or partition in wanted_partitions:
                            yield loc, record
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise AtmError(f"{path}: not a readable MASSIVE tar.gz archive ({exc}); {FIX_HINT}") from None


def read_massive(
    locales: Collection[str] | None = None,
    partitions: Collection[str] | None = None,
    *,
    char_split_locales: Collection[str] = CHAR_SPLIT_LOCALES,
) -> list[MassiveExample]:
    """Read MASSIVE examples with word-level BIO slot tags.

    Args:
        locales: locale codes (a single string is accepted), or None for every locale in the archive.
        partitions: subset of ``("train", "dev", "test")``, or None for all.
        char_split_locales: locales whose non-ASCII text is split into characters (default: ja-JP,
            zh-CN, zh-TW as in the official preprocessing; pass ``()`` for whitespace tokens everywhere).

    Returns:
        Examples in archive order (locales alphabetically, records in file order).

    Raises:
        AtmError: unknown locale/partition; ``"<archive>:<member>:<line>: ..."`` for malformed JSON, a
            missing or non-string field, a locale field that disagrees with the file, or a malformed
            slot annotation.
    """
    examples = []
    for loc, record in iter_massive_records(locales, partitions):
        locale = record["locale"]
        annot = get_field(record, "annot_utt", loc)
        words, tags = parse_annot_utt(annot, loc, char_split=locale in char_split_locales)
        examples.append(
            MassiveExample(
                id=str(get_field(record, "id", loc, (str, int))),
                locale=locale,
                partition=record["partition"],
                scenario=get_field(record, "scenario", loc),
                intent=get_field(record, "intent", loc),
                utt=get_field(record, "utt", loc),
                words=tuple(words),
                slot_tags=tuple(tags),
            )
        )
    return examples


def massive_utterances(partition: str, locales: Collection[str] | None = None) -> dict[str, list[str]]:
    """Return the ``utt`` strings of one partition as ``{locale: [utt, ...]}`` (file order).

    Cheaper than :func:`read_massive` (no slot parsing); the table of all utterances is memoised in
    the data directory, so repeated calls across processes do not re-parse the archive.

    Raises:
        AtmError: unknown locale or partition, or a malformed record (see :func:`iter_massive_records`).
    """
    wanted = _check_choice("locale", locales, massive_locales())
    _check_choice("partition", [partition], PARTITIONS)
    path = _archive()
    table = _utterance_table(path, _stamp(path))
    return {locale: list(utts[partition]) for locale, utts in table.items() if wanted is None or locale in wanted}


@functools.lru_cache(maxsize=2)
def _utterance_table(path: Path, stamp: tuple[int, int]) -> dict[str, dict[str, list[str]]]:
    def build() -> dict[str, dict[str, list[str]]]:
        table: dict[str, dict[str, list[str]]] = {}
        for loc, record in iter_massive_records():
            partitions = table.setdefault(record["locale"], {p: [] for p in PARTITIONS})
            partitions.setdefault(record["partition"], []).append(get_field(record, "utt", loc))
        return table

    return derived("massive-utterances", 1, [path], build)


@functools.cache
def _label_inventory() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    train = read_massive(["en-US"], ["train"])
    slot_types = sorted({tag[2:] for ex in train for tag in ex.slot_tags if tag != OUTSIDE})
    return (
        tuple(sorted({ex.intent for ex in train})),
        tuple(sorted({ex.scenario for ex in train})),
        (OUTSIDE, *(f"{prefix}-{slot}" for slot in slot_types for prefix in "BI")),
    )


def intent_labels() -> list[str]:
    """Return the sorted intent inventory of en-US train (60 intents, e.g. ``"alarm_set"``)."""
    return list(_label_inventory()[0])


def scenario_labels() -> list[str]:
    """Return the sorted scenario inventory of en-US train (18 scenarios, e.g. ``"alarm"``)."""
    return list(_label_inventory()[1])


def slot_labels() -> list[str]:
    """Return the BIO slot label list: ``"O"`` first, then ``B-<type>``, ``I-<type>`` per slot type, sorted.

    Slot types are those of en-US train (55); both B- and I- tags are listed for every type.
    """
    return list(_label_inventory()[2])
