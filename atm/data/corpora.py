"""Pretraining text (Stage 1 written form, Stage 2 spoken form), held-out text, and the evaluation-text filter.

Every pretraining line whose normalised form (:func:`normalize_text`) occurs in any evaluation split
(:func:`evaluation_texts`) is dropped, and repeats of a normalised form are dropped anywhere in the
corpus (first occurrence wins); then the optional per-(source, language) cap is applied by seeded
sampling. The number of lines read, dropped as evaluation text, dropped as repeats and kept is logged
per source. The filtered corpora and the evaluation-text set are memoised in the data directory
(``.derived/``), keyed by every file they read, so capped demo corpora build in about a second.

Sources (``TextLine.source``):

* written: ``ud`` (UD train treebanks: English-EWT, Turkish-IMST, Vietnamese-VTB), ``udpos_xtreme``
  (XTREME udpos train files, tokens joined with spaces), ``xnli`` (premises and hypotheses of the
  XNLI training sets);
* spoken: ``massive`` (``utt`` of the train partition, ``lang`` = locale), ``slurp_lm`` (SLURP
  ``lm.txt``, ``lang`` = ``en-US``);
* held out (not filtered, not de-duplicated): ``ud_dev`` (UD dev treebanks), ``massive_dev``
  (MASSIVE dev utterances).

Inside an MLflow run, every corpus returned is logged as one MLflow dataset per source
(:mod:`atm.data.mlflow_datasets`): ``<kind>/<source>`` (``written/ud``, ``spoken/massive``, ...; held out:
``written/ud_dev``, ``spoken/massive_dev``), context ``training`` (held out: ``evaluation``), profile
``num_rows`` and ``num_rows_per_language`` of the lines returned, digest over those lines. (The latency sample of
:mod:`atm.models.cost`, MASSIVE dev utterances too, is logged as ``cost/massive_dev``.)
"""

from __future__ import annotations

import functools
import logging
import random
import sys
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from atm.data.cache import derived
from atm.data.fetch import data_dir, fetch, mirror_dir
from atm.data.massive import MASSIVE_ARCHIVE, massive_locales, massive_utterances
from atm.data.mlflow_datasets import DataRead, digest, log_reads, log_text_dataset, text_read
from atm.data.shards import TokenizedCorpus
from atm.data.slurp import SLURP_LM, SLURP_SPLITS, slurp_lm_lines, slurp_sentences
from atm.data.ud import read_conllu, read_udpos_tsv, ud_files, udpos_files
from atm.data.xnli import read_xnli_file, xnli_eval_files, xnli_train_languages
from atm.errors import AtmError

log = logging.getLogger(__name__)


class TextLine(NamedTuple):
    """One line of text with its language (ISO code, or MASSIVE locale) and source name."""

    lang: str
    text: str
    source: str


def normalize_text(text: str) -> str:
    """Return the form used to compare texts across sources: NFKC, casefolded, punctuation and whitespace removed.

    Whitespace is removed rather than collapsed because the same sentence appears with its original
    spacing (UD ``# text``), as space-joined tokens (udpos_xtreme, XNLI machine translations) or with
    slot-boundary spaces (MASSIVE ja/zh), and unspaced scripts (ja, zh, th) are compared as a whole.
    Punctuation (Unicode category P*) and invisible format characters (Cf, e.g. zero-width joiners) are
    removed so that ``"what's the weather?"`` and ``"whats the weather"`` count as the same utterance.
    """
    return "".join(unicodedata.normalize("NFKC", text).casefold().translate(_punctuation_table()).split())


@functools.cache
def _punctuation_table() -> dict[int, None]:
    """Deletion table for :meth:`str.translate`: punctuation (P*) and format (Cf) characters."""
    categories = (unicodedata.category(chr(cp)) for cp in range(sys.maxunicode + 1))
    return {cp: None for cp, cat in enumerate(categories) if cat[0] == "P" or cat == "Cf"}


# ---------------------------------------------------------------------------------------------
# sources: one file (mirror-layout path) and how to get its lines

TextsFn = Callable[[Path, str], Iterable[str]]  # (local path, lang) -> lines


class _Source(NamedTuple):
    name: str  # TextLine.source
    lang: str
    rel: str  # the file read, in the mirror layout
    texts: TextsFn


def _conllu_texts(path: Path, lang: str) -> Iterable[str]:
    return (sentence.text for sentence in read_conllu(path, lang))


def _udpos_texts(path: Path, lang: str) -> Iterable[str]:
    return (sentence.text for sentence in read_udpos_tsv(path, lang))


def _xnli_texts(path: Path, lang: str) -> Iterable[str]:
    pairs = list(read_xnli_file(path, lang))
    return [pair.premise for pair in pairs] + [pair.hypothesis for pair in pairs]


def _slurp_texts(path: Path, _lang: str) -> Iterable[str]:
    return slurp_sentences(path.name.split(".", 1)[0])


def _slurp_lm_texts(_path: Path, _lang: str) -> Iterable[str]:
    return slurp_lm_lines()


def _massive_sources(name: str, partitions: Sequence[str], locales: Iterable[str]) -> list[_Source]:
    def texts(_path: Path, locale: str) -> list[str]:
        return [utt for partition in partitions for utt in massive_utterances(partition, [locale])[locale]]

    return [_Source(name, locale, MASSIVE_ARCHIVE, texts) for locale in locales]


def _file_sources(name: str, files: dict[str, str], texts: TextsFn) -> list[_Source]:
    """Sources for ``{mirror path: lang}`` files read by ``texts``."""
    return [_Source(name, lang, rel, texts) for rel, lang in files.items()]


def _evaluation_sources() -> list[_Source]:
    slurp = {f"slurp/dataset/slurp/{split}.jsonl.gz": "en-US" for split in SLURP_SPLITS}
    return [
        *_massive_sources("massive", ("dev", "test"), massive_locales()),
        *_file_sources("slurp", slurp, _slurp_texts),
        *_file_sources("xnli", xnli_eval_files(), _xnli_texts),
        *(source for split in ("dev", "test") for source in [  # UD dev/test: the PUD sets are test files
            *_file_sources("ud", ud_files(split), _conllu_texts),
            *_file_sources("udpos_xtreme", udpos_files(split), _udpos_texts),
        ]),
    ]  # fmt: skip


def _written_sources() -> list[_Source]:
    xnli = {f"xnli/hf_jsonl/{lang}/train.jsonl.gz": lang for lang in xnli_train_languages()}
    return [
        *_file_sources("ud", ud_files("train"), _conllu_texts),
        *_file_sources("udpos_xtreme", udpos_files("train"), _udpos_texts),
        *_file_sources("xnli", xnli, _xnli_texts),
    ]


def _spoken_sources() -> list[_Source]:
    return [
        *_massive_sources("massive", ("train",), massive_locales()),
        *_file_sources("slurp_lm", {SLURP_LM: "en-US"}, _slurp_lm_texts),
    ]


def _fetch_all(sources: Iterable[_Source]) -> dict[str, Path]:
    """Fetch every file the sources read (so that memo keys cover them): ``{rel: local path}``."""
    return {rel: fetch(rel) for rel in dict.fromkeys(source.rel for source in sources)}


# ---------------------------------------------------------------------------------------------
# evaluation splits


def evaluation_texts() -> frozenset[str]:
    """Return the normalised text (:func:`normalize_text`) of every evaluation split.

    Covers MASSIVE dev and test ``utt`` (all locales), SLURP devel/test sentences, XNLI dev and test
    premises and hypotheses (XTREME TSV and JSON-lines formats, all languages), UD dev/test sentences
    of every available treebank including the 11 PUD sets, and udpos_xtreme dev/test sentences.
    Computed once per process and data location, and memoised in the data directory.

    Raises:
        AtmError: an evaluation file is missing or malformed.
    """
    return _evaluation_texts(data_dir(), mirror_dir())


@functools.lru_cache(maxsize=4)
def _evaluation_texts(_data_dir: Path, _mirror: Path | None) -> frozenset[str]:
    sources = _evaluation_sources()
    paths = _fetch_all(sources)

    def build() -> frozenset[str]:
        return frozenset(
            normalize_text(text) for source in sources for text in source.texts(paths[source.rel], source.lang)
        )

    return derived("evaluation-texts", 3, paths.values(), build)


# ---------------------------------------------------------------------------------------------
# corpus assembly

#: Filtered lines per source: [(source name, lang, lines)], and per source name the counts
#: (read, dropped as evaluation text, dropped as repeats, kept).
_Groups = list[tuple[str, str, list[str]]]
_Stats = dict[str, tuple[int, int, int, int]]


def _filter(
    sources: Iterable[_Source], paths: dict[str, Path], exclude: Collection[str], dedup: bool
) -> tuple[_Groups, _Stats]:
    """Strip lines, drop blanks, lines in ``exclude`` and (with ``dedup``) repeats across all sources."""
    seen: set[str] = set()
    groups: _Groups = []
    stats: dict[str, list[int]] = {}
    for source in sources:
        counts = stats.setdefault(source.name, [0, 0, 0, 0])
        kept: list[str] = []
        for line in source.texts(paths[source.rel], source.lang):
            if not (text := line.strip()):
                continue
            counts[0] += 1
            key = normalize_text(text)
            if key in exclude:
                counts[1] += 1
            elif dedup and key in seen:
                counts[2] += 1
            else:
                seen.add(key)
                kept.append(text)
        counts[3] += len(kept)
        groups.append((source.name, source.lang, kept))
    return groups, {name: tuple(counts) for name, counts in stats.items()}


def _cap(groups: _Groups, cap: int | None, seed: int) -> list[TextLine]:
    """Keep at most ``cap`` lines per (source, lang) by seeded sampling, in their original order."""
    if cap is not None and cap < 0:
        raise AtmError(f"a line cap must be >= 0 or None, got {cap}")
    corpus: list[TextLine] = []
    for name, lang, lines in groups:
        if cap is not None and len(lines) > cap:
            rng = random.Random(f"{seed}/{name}/{lang}")
            lines = [lines[i] for i in sorted(rng.sample(range(len(lines)), cap))]
        corpus.extend(TextLine(lang, text, name) for text in lines)
    return corpus


def _by_source(sources: Sequence[_Source], lines: Iterable[TextLine]) -> dict[str, tuple[list[TextLine], list[str]]]:
    """Per source name of ``sources``, in their order: its ``lines`` and the files (mirror layout) it reads."""
    groups = {source.name: ([], []) for source in sources}
    for source in sources:
        if source.rel not in groups[source.name][1]:
            groups[source.name][1].append(source.rel)
    for line in lines:
        groups[line.source][0].append(line)
    return groups


def _reads(kind: str, sources: Sequence[_Source], lines: Sequence[TextLine], context: str) -> Iterable[DataRead]:
    """One MLflow dataset per source name of ``sources``: ``<kind>/<source>``, the ``lines`` of that source."""
    for name, (group, files) in _by_source(sources, lines).items():
        yield text_read(f"{kind}/{name}", [line.text for line in group], files, context,
                        langs=[line.lang for line in group])


def _pretraining_corpus(kind: str, sources: list[_Source], cap: int | None, seed: int) -> list[TextLine]:
    paths = _fetch_all(sources)
    evaluation_paths = _fetch_all(_evaluation_sources())
    groups, stats = derived(
        f"{kind}-corpus",
        3,
        [*paths.values(), *evaluation_paths.values()],
        lambda: _filter(sources, paths, evaluation_texts(), dedup=True),
    )
    for name, (read, evaluation, repeats, kept) in stats.items():
        log.info(
            "%s corpus, source %s: %d lines read, %d dropped as evaluation-split text, %d repeats dropped, "
            "%d kept",
            kind, name, read, evaluation, repeats, kept,
        )  # fmt: skip
    corpus = _cap(groups, cap, seed)
    log_reads(_reads(kind, sources, corpus, "training"))
    return corpus


def written_corpus(max_lines_per_source: int | None = None, seed: int = 0) -> list[TextLine]:
    """Return the Stage-1 written-form pretraining text.

    Sources, in this order: ``ud`` (sentences of every available UD train treebank: English-EWT,
    Turkish-IMST, Vietnamese-VTB), ``udpos_xtreme`` (every ``train-<lang>`` file), ``xnli`` (premises,
    then hypotheses, of every XNLI training set). ``lang`` is the ISO 639 code.

    Args:
        max_lines_per_source: keep at most this many lines per (source, lang), chosen by seeded
            sampling after filtering (None: everything).
        seed: sampling seed; the same seed gives the same lines.

    Returns:
        Lines with no evaluation-split text (:func:`evaluation_texts`) and no repeats, in source order;
        inside an MLflow run also logged as the datasets ``written/<source>`` (see the module doc).

    Raises:
        AtmError: a source or evaluation file is missing or malformed; a negative cap.
    """
    return _pretraining_corpus("written", _written_sources(), max_lines_per_source, seed)


def spoken_corpus(max_lines_per_source: int | None = None, seed: int = 0) -> list[TextLine]:
    """Return the Stage-2 spoken-form (voice-assistant) pretraining text.

    Sources: ``massive`` (``utt`` of the train partition of every locale; ``lang`` is the locale, e.g.
    ``de-DE``) and ``slurp_lm`` (SLURP ``lm.txt``, ``lang`` ``en-US``). Many short utterances of these
    also occur in MASSIVE/SLURP dev and test, and most of ``lm.txt`` repeats MASSIVE en-US train (the
    SLURP train text); both are dropped.

    Args:
        max_lines_per_source: keep at most this many lines per (source, lang) (None: everything).
        seed: sampling seed.

    Returns:
        Lines with no evaluation-split text and no repeats, in source order; inside an MLflow run also
        logged as the datasets ``spoken/<source>`` (see the module doc).

    Raises:
        AtmError: a source or evaluation file is missing or malformed; a negative cap.
    """
    return _pretraining_corpus("spoken", _spoken_sources(), max_lines_per_source, seed)


def _heldout(log_as: str, sources: list[_Source], cap: int | None, seed: int) -> list[TextLine]:
    """The capped held-out lines of ``sources``; memoised per process and data location, because
    in-training evaluation (pruning reports) asks for the same lines many times. Logged (once per run) as the
    MLflow dataset ``log_as``, context ``evaluation``."""
    lines = list(_heldout_memo(tuple(sources), cap, seed, data_dir(), mirror_dir()))
    log_text_dataset(log_as, [line.text for line in lines], [source.rel for source in sources], "evaluation",
                     langs=[line.lang for line in lines])
    return lines


@functools.lru_cache(maxsize=16)
def _heldout_memo(sources: tuple[_Source, ...], cap: int | None, seed: int, _data_dir: Path,
                  _mirror: Path | None) -> tuple[TextLine, ...]:
    groups, _ = _filter(list(sources), _fetch_all(sources), exclude=frozenset(), dedup=False)
    return tuple(_cap(groups, cap, seed))


def heldout_written(max_lines_per_lang: int | None = None, seed: int = 0) -> list[TextLine]:
    """Return held-out written text for perplexity: UD dev sentences (source ``ud_dev``).

    Treebanks: English-EWT, German/French/Spanish/Japanese/Russian-GSD, Chinese-GSDSimp, Turkish-IMST and
    Vietnamese-VTB dev (every available ``*-ud-dev.conllu``). These are evaluation text, so none of
    them occurs in :func:`written_corpus`. Nothing is de-duplicated; ``max_lines_per_lang`` caps each
    language by seeded sampling.
    """
    sources = _file_sources("ud_dev", ud_files("dev"), _conllu_texts)
    return _heldout("written/ud_dev", sources, max_lines_per_lang, seed)


def heldout_spoken(
    max_lines_per_lang: int | None = None, locales: Collection[str] | None = None, seed: int = 0, *,
    log_as: str = "spoken/massive_dev",
) -> list[TextLine]:
    """Return held-out spoken text for perplexity: MASSIVE dev utterances (source ``massive_dev``).

    Args:
        max_lines_per_lang: cap per locale, by seeded sampling (None: all 2,033 per locale).
        locales: MASSIVE locales (a single string is accepted; None: all).
        seed: sampling seed.
        log_as: the name of the MLflow dataset the lines are logged as inside a run (context ``evaluation``);
            another name for another use of the same text (the latency sample of :mod:`atm.models.cost`).

    Raises:
        AtmError: unknown locale, negative cap.
    """
    chosen = list(massive_utterances("dev", locales))  # checks the locales
    return _heldout(log_as, _massive_sources("massive_dev", ("dev",), chosen), max_lines_per_lang, seed)


# ---------------------------------------------------------------------------------------------
# what a stage trains on: the configured or built-in sources of a kind, tokenized into a shard

KINDS = ("written", "spoken")


def shards_dir(data_cfg: Mapping) -> Path:
    """``data.shards.dir``, else ``<data dir>/shards``."""
    configured = (data_cfg.get("shards") or {}).get("dir")
    return Path(configured).expanduser() if configured else data_dir() / "shards"


def corpus_shard(kind: str, data_cfg: Mapping, tokenizer, seed: int = 0) -> TokenizedCorpus:
    """The pretraining text of ``kind`` (``written``: Stage 1, ``spoken``: Stage 2) tokenized once by ``tokenizer``
    into a memory-mapped token shard (:func:`atm.data.shards.build_shard`), built on first use and reused after.

    The sources are ``data.<kind>.paths``/``hf`` when set (:mod:`atm.data.sources`: read whole, evaluation-split
    text dropped while tokenizing, in ``data.shards.workers`` processes), else the built-in corpus
    (:func:`written_corpus`/:func:`spoken_corpus`, capped at ``data.<kind>.max_lines_per_source`` with ``seed``).
    Inside an MLflow run every source is logged as the dataset ``<kind>/<source>`` (for configured sources:
    :func:`_source_read`) and the shard's per-source counts, tokens included, as the artifact
    ``data/<kind>_sources.json``.

    Raises:
        AtmError: unknown ``kind``; bad sources (see :func:`atm.data.sources.configured_sources`), a bad file or
            line while reading, a shard that cannot be written.
    """
    from atm.data.shards import TextSource, build_shard
    from atm.data.sources import FileSource, configured_sources

    if kind not in KINDS:
        raise AtmError(f"corpus {kind!r} must be one of {', '.join(KINDS)}")
    setting = data_cfg.get(kind) or {}
    configured = configured_sources(data_cfg, kind)
    workers = (data_cfg.get("shards") or {}).get("workers")
    if not configured:
        corpus = _built_in(kind)[0](setting.get("max_lines_per_source"), seed)
        built_in = [TextSource(name, [line.text for line in group], tuple(files))
                    for name, (group, files) in _by_source(_built_in(kind)[1](), corpus).items()]
        return build_shard(built_in, tokenizer, shards_dir(data_cfg), workers=workers or 1, desc=f"tokenize {kind}")
    size = sum(s.size() for s in configured) if all(isinstance(s, FileSource) for s in configured) else None
    shard = build_shard(configured, tokenizer, shards_dir(data_cfg), decontaminate=True, workers=workers,
                        input_bytes=size, desc=f"tokenize {kind}")
    for counts in shard.sources:
        if not counts.kept:
            log.warning("data.%s source %s: no line to train on (%d read, %d of them evaluation-split text)",
                        kind, counts.name, counts.read, counts.dropped_evaluation)
    if not shard.n_lines:
        raise AtmError(f"data.{kind}: no text to train on in {', '.join(c.name for c in shard.sources)} (every "
                       "line blank or evaluation-split text)")
    log_reads(_source_read(kind, c.name, c.digest, c.kept, c.read, c.dropped_evaluation, c.files)
              for c in shard.sources)
    _log_source_counts(kind, shard)
    return shard


def _built_in(kind: str) -> tuple[Callable[[int | None, int], list[TextLine]], Callable[[], list[_Source]]]:
    """The built-in corpus of ``kind`` and its sources: (:func:`written_corpus`, ``_written_sources``) or the
    spoken pair."""
    return (written_corpus, _written_sources) if kind == "written" else (spoken_corpus, _spoken_sources)


def _source_read(kind: str, name: str, digest: str, kept: int, read: int, dropped: int,
                 files: Sequence[str]) -> DataRead:
    """The MLflow dataset ``<kind>/<name>`` of a configured source: digest of the kept lines, profile ``num_rows``
    (kept), ``num_rows_read``, ``num_rows_dropped_evaluation`` and ``files`` -- nothing tokenizer-dependent, since
    MLflow keeps one profile per name and digest."""
    return DataRead(f"{kind}/{name}", "training", digest,
                    {"num_rows": kept, "num_rows_read": read, "num_rows_dropped_evaluation": dropped,
                     "files": list(files)}, tuple(files))


def _log_source_counts(kind: str, shard: TokenizedCorpus) -> None:
    from atm.data.mlflow_datasets import active_run_id

    if active_run_id() is not None:
        import mlflow

        mlflow.log_dict({"shard": str(getattr(shard.tokens, "filename", "") or ""), "lines": shard.n_lines,
                         "tokens": shard.n_tokens, "sources": shard.meta.get("sources", [])},
                        f"data/{kind}_sources.json")


def tokenizer_lines(kind: str, data_cfg: Mapping, cap: int | None, seed: int = 0) -> list[str]:
    """The text of ``kind`` the tokenizer trains on: a seeded sample of at most ``cap`` lines per configured source
    (:func:`atm.data.sources.sample_lines`, evaluation-split text dropped; logged as ``<kind>/<source>``), else the
    built-in corpus capped at ``cap`` lines per (source, language).

    Raises:
        AtmError: as :func:`corpus_shard`.
    """
    from atm.data.sources import configured_sources, sample_lines

    configured = configured_sources(data_cfg, kind)
    if not configured:
        return [line.text for line in _built_in(kind)[0](cap, seed)]
    exclude, lines = evaluation_texts(), []
    for source in configured:
        sample = sample_lines(source, cap, seed, exclude)
        log_reads([_source_read(kind, source.name, digest(sample.lines), len(sample.lines), sample.read,
                                sample.dropped_evaluation, source.files)])
        lines.extend(sample.lines)
    return lines
