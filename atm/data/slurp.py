"""SLURP text: the devel/test utterance records and the in-domain language-model text ``lm.txt``.

Mirror layout: ``slurp/dataset/slurp/{devel,test}.jsonl.gz`` (SLURP's own JSON lines; the ``sentence``
field is the utterance) and ``slurp/dataset/lm/lm.txt.gz`` (one utterance a line). SLURP's train file is
not available; MASSIVE en-US train is the same text (see ``massive``).
"""

from __future__ import annotations

from atm.data.fetch import fetch
from atm.data.text import get_field, read_jsonl, read_lines
from atm.errors import AtmError

SLURP_SPLITS: tuple[str, ...] = ("devel", "test")
SLURP_LM = "slurp/dataset/lm/lm.txt.gz"


def slurp_sentences(split: str) -> list[str]:
    """Return the ``sentence`` of every record of a SLURP split (``"devel"``: 2,033, ``"test"``: 2,974).

    Raises:
        AtmError: unknown split; ``"<path>:<line>: ..."`` for malformed JSON or a missing ``sentence``.
    """
    if split not in SLURP_SPLITS:
        raise AtmError(f"unknown SLURP split {split!r} (available: {', '.join(SLURP_SPLITS)})")
    path = fetch(f"slurp/dataset/slurp/{split}.jsonl.gz")
    return [get_field(record, "sentence", loc) for loc, record in read_jsonl(path)]


def slurp_lm_lines() -> list[str]:
    """Return the non-blank, stripped lines of SLURP's ``lm.txt`` (29,104 assistant utterances)."""
    return list(read_lines(fetch(SLURP_LM)))
