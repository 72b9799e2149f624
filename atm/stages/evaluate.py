"""Stage ``evaluate``: perplexity, mask-filling and XNLI zero-shot for every checkpoint of a run.

The ``target`` input names a training run (by role, ``runs:/<id>`` or a path). With
``eval.checkpoints=all`` each intermediate checkpoint (``checkpoints/step-<N>``) and the final one are
scored, and every metric is logged with ``step`` = the checkpoint's training step, which is what
``analysis/correlate_xnli.py`` correlates (AlexaTM, FitzGerald et al. KDD 2022, sec. 4.2, Table 3).

Metrics (fractions; perplexities in tokens, ``exp`` of the mean masked-token NLL in nats; ``_lo``/``_hi``:
95% interval):

* ``eval/perplexity/written`` (UD dev sentences) and ``eval/perplexity/spoken`` (MASSIVE dev utterances),
  the held-out perplexities every MLM stage also logs; per language ``eval/perplexity/written/<lang>``
  (UD PUD sentences of ``eval.perplexity.written_languages``) and ``eval/perplexity/spoken/<locale>``
  (MASSIVE test utterances of ``eval.perplexity.spoken_locales``);
* written mask filling (UD PUD, words tagged NOUN) ``eval/mask_fill/<lang>/noun_{accuracy, top10, mrr}``
  and their means over languages ``eval/mask_fill/noun_{accuracy, top10, mrr}``; spoken mask filling
  (MASSIVE test, the words inside slot spans) ``eval/mask_fill/spoken/<locale>/slot_{accuracy, top10, mrr}``
  and the means ``eval/mask_fill/spoken/slot_{accuracy, top10, mrr}``. One word is masked at a time -- all
  of its sub-tokens -- and ranked (:func:`atm.probes.mask_fill.word_ranks`: the maximum over its positions of
  the original sub-token's rank); ``accuracy`` is top-1 (the argmax right at every position), ``top10`` rank
  <= 10, ``mrr`` the mean of 1/rank (Voorhees 1999). Per language also ``_lo``/``_hi`` (bootstrap over words);
* XNLI zero-shot (Conneau et al. 2018): a classifier fine-tuned on English per seed of ``eval.xnli.seeds``,
  tested on ``eval.xnli.languages`` (null: every language with a labelled test set; :mod:`atm.probes.xnli`):
  ``eval/xnli/<lang>/accuracy`` (mean over seeds) with ``_lo``/``_hi`` (over seeds; one seed: bootstrap over test pairs) and ``_se``,
  ``eval/xnli/<lang>/pred_share/<class>``, ``eval/xnli/<lang>/degenerate`` (1 when a seed's classifier never
  predicts some class there), ``eval/xnli/avg_accuracy`` (with ``_lo``/``_hi``) and
  ``eval/xnli/degenerate_languages``;
* ``eval/checkpoint_seconds``: wall time of scoring the checkpoint.

Artifacts: tables (rows: language, columns: checkpoint step) ``evaluation/{xnli, perplexity, mask_fill,
mask_fill_top10, mask_fill_mrr}.{csv,md}`` (a degenerate XNLI probe's accuracy reads ``degenerate``); every
metric of every checkpoint ``evaluation/checkpoints.csv``; the per-example rows of each checkpoint
``evaluation/examples/step-<N:06d>.csv`` (:mod:`atm.probes.examples`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from omegaconf import DictConfig
from tqdm.auto import tqdm

from atm import tracking
from atm.data.massive import OUTSIDE
from atm.data.mlflow_datasets import examples_read, log_reads
from atm.data.ud import PUD_FILES, UdSentence, pud_sentences
from atm.data.xnli import xnli_test_languages
from atm.engine.loop import device_for
from atm.errors import AtmError
from atm.models.encoder import load_checkpoint
from atm.probes.examples import concat, example_frame
from atm.probes.mask_fill import TOP_K, Probe, rank_scores, word_mask_fill, word_ranks
from atm.probes.perplexity import heldout_perplexities, mlm_perplexity
from atm.probes.xnli import XnliData, check_xnli, encode_xnli, read_xnli, xnli_probe
from atm.stages.common import check_data, count_at_least
from atm.stages.registry import stage
from atm.tasks.massive import log_examples, read_locales

#: Artifact directory of the per-example rows, one CSV per checkpoint step.
EXAMPLES_DIR = "evaluation/examples"


# ------------------------------------------------------------------------------------ mask filling


def noun_probes(lang: str, max_sentences: int) -> list[Probe]:
    """The first ``max_sentences`` UD PUD sentences of ``lang`` with their words tagged NOUN."""
    return _noun_probes(pud_sentences(lang)[:max_sentences])


def _noun_probes(sentences: Sequence[UdSentence]) -> list[Probe]:
    return [(sent.words, [w for w, tag in enumerate(sent.upos) if tag == "NOUN"]) for sent in sentences]


def slot_probes(examples) -> list[Probe]:
    """MASSIVE utterances with the words inside their slot spans (tag other than ``O``)."""
    return [(ex.words, [w for w, tag in enumerate(ex.slot_tags) if tag != OUTSIDE]) for ex in examples]


def noun_mask_fill(model, tokenizer, lang: str, max_sentences: int, max_seq_len: int) -> float:
    """Noun mask-filling accuracy on the first ``max_sentences`` UD PUD sentences of ``lang`` (AlexaTM sec.
    4.2): :func:`word_mask_fill` over every word tagged NOUN."""
    return word_mask_fill(model, tokenizer, noun_probes(lang, max_sentences), max_seq_len)


#: Mask-filling probe -> (metric key of a language, ``{}`` = the language; of the mean over languages).
MASK_FILL_KEYS = {"noun": ("eval/mask_fill/{}/noun", "eval/mask_fill/noun"),
                  "slot": ("eval/mask_fill/spoken/{}/slot", "eval/mask_fill/spoken/slot")}


def mask_fill_metrics(model, tokenizer, probes: dict[str, list[Probe]], max_seq_len: int, probe: str
                      ) -> tuple[dict[str, float], pd.DataFrame]:
    """Whole-word mask filling per language (:func:`atm.probes.mask_fill.word_ranks`) and the means over
    languages.

    Args:
        probes: per language (``noun``) or MASSIVE locale (``slot``), the probed sentences.
        probe: ``noun`` or ``slot`` (:data:`MASK_FILL_KEYS`).

    Returns:
        ``(metrics, examples)``: ``<key>_accuracy`` (top-1), ``<key>_top10``, ``<key>_mrr`` per language with
        their bootstrap ``_lo``/``_hi`` over words (:func:`atm.probes.mask_fill.rank_scores`), and their means
        over languages (no interval); one example row per scored word (:mod:`atm.probes.examples`).
    """
    lang_key, mean_key = MASK_FILL_KEYS[probe]
    out: dict[str, float] = {}
    frames, scores = [], {}
    for lang, lang_probes in probes.items():
        items, ranks = word_ranks(model, tokenizer, lang_probes, max_seq_len)
        frames.append(example_frame(probe, lang, items, ranks == 1, rank=ranks))
        scores[lang] = rank_scores(ranks, TOP_K, intervals=True)
        out.update({f"{lang_key.format(lang)}_{name}": value for name, value in scores[lang].items()})
    if scores:
        for name in ("accuracy", f"top{TOP_K}", "mrr"):
            out[f"{mean_key}_{name}"] = sum(s[name] for s in scores.values()) / len(scores)
    return out, concat(frames)


# ---------------------------------------------------------------------------------------------- XNLI


def xnli_zero_shot(mlm, tokenizer, pairs: XnliData, cfg: DictConfig, trainer_cfg: DictConfig
                   ) -> tuple[dict[str, float], pd.DataFrame]:
    """Fine-tune the checkpoint's encoder on English XNLI once per seed of ``eval.xnli.seeds``, test every
    language of ``pairs`` (Conneau et al. 2018 zero-shot cross-lingual transfer): :func:`atm.probes.xnli.xnli_probe`
    on the pairs tokenized once (:func:`atm.probes.xnli.encode_xnli`).

    Args:
        mlm: the checkpoint's MLM (not modified); ``pairs``: :func:`atm.probes.xnli.read_xnli`.
        cfg: the ``eval.xnli`` group; ``trainer_cfg``: the ``trainer`` group (device, precision, ...).

    Returns:
        ``(metrics, examples)`` of :func:`atm.probes.xnli.xnli_probe`: ``eval/xnli/<lang>/accuracy`` (mean over
        seeds) with ``_lo``/``_hi``/``_se``, ``.../pred_share/<class>``, ``.../degenerate``,
        ``eval/xnli/avg_accuracy`` (with ``_lo``/``_hi``), ``eval/xnli/degenerate_languages``.
    """
    return xnli_probe(mlm, tokenizer, encode_xnli(tokenizer, pairs, cfg.max_seq_len), cfg, trainer_cfg)


# ------------------------------------------------------------------------------------ evaluation data


@dataclass
class EvalData:
    """The per-language evaluation text, read once for every checkpoint of a run.

    Attributes:
        written: UD PUD sentence texts per language (written-form perplexity).
        spoken: MASSIVE test utterances per locale (spoken-form perplexity).
        nouns: noun probes per PUD language (written mask-filling).
        slots: slot-word probes per MASSIVE locale (spoken mask-filling).
        xnli: the English XNLI training pairs and the test pairs of ``eval.xnli.languages``.
    """

    written: dict[str, list[str]] = field(default_factory=dict)
    spoken: dict[str, list[str]] = field(default_factory=dict)
    nouns: dict[str, list[Probe]] = field(default_factory=dict)
    slots: dict[str, list[Probe]] = field(default_factory=dict)
    xnli: XnliData = field(default_factory=lambda: XnliData([], {}))


def _longest(read: dict[str, list], lang: str, rows: list) -> list:
    """Keep in ``read[lang]`` the longer of it and ``rows`` (both prefixes of one file); return ``rows``."""
    if len(rows) >= len(read.get(lang, ())):
        read[lang] = rows
    return rows


def _sentence_key(sentence: UdSentence) -> str:
    """The text of a UD sentence that its MLflow dataset digest covers: text, words, UPOS tags."""
    return f"{sentence.text}\t{' '.join(sentence.words)}\t{' '.join(sentence.upos)}"


def eval_data(eval_cfg: DictConfig) -> EvalData:
    """Read the text of every per-language probe of ``eval_cfg`` (the ``eval`` group).

    Inside an MLflow run, what is read is logged as MLflow datasets (:mod:`atm.data.mlflow_datasets`), context
    ``test``: per PUD language ``ud_pud/test/<lang>`` and per MASSIVE locale ``massive/test/<locale>``, the
    longer of the prefixes that the perplexity and mask-filling probes read; the XNLI pairs by
    :func:`atm.probes.xnli.read_xnli`.

    Raises:
        AtmError: naming the key: an unknown PUD language or MASSIVE locale, or one without test data.
    """
    ppl, fill = eval_cfg.perplexity, eval_cfg.mask_fill
    cap = ppl.max_lines_per_lang
    data = EvalData()
    pud: dict[str, list[UdSentence]] = {}  # per language the sentences read (a prefix of its file)
    massive: dict[str, list] = {}  # per locale the MASSIVE test examples read (a prefix of the partition)
    for key, langs, fill_in in (
            ("eval.perplexity.written_languages", ppl.written_languages,
             lambda lang: data.written.__setitem__(
                 lang, [s.text for s in _longest(pud, lang, pud_sentences(lang)[:cap])])),
            ("eval.mask_fill.languages", fill.languages,
             lambda lang: data.nouns.__setitem__(
                 lang, _noun_probes(_longest(pud, lang, pud_sentences(lang)[:fill.max_sentences_per_lang]))))):
        for lang in langs or []:
            try:
                fill_in(lang)
            except AtmError as err:
                raise AtmError(f"{key}: {err}") from None
    if ppl.spoken_locales:
        found = read_locales(list(ppl.spoken_locales), "test", "eval.perplexity.spoken_locales")
        data.spoken = {loc: [ex.utt for ex in _longest(massive, loc, examples[:cap])]
                       for loc, examples in found.items()}
    if fill.spoken_locales:
        found = read_locales(list(fill.spoken_locales), "test", "eval.mask_fill.spoken_locales")
        data.slots = {loc: slot_probes(_longest(massive, loc, examples[:fill.max_utterances_per_locale]))
                      for loc, examples in found.items()}
    data.xnli = read_xnli(eval_cfg.xnli, list(eval_cfg.xnli.get("languages") or xnli_test_languages()))
    log_reads(examples_read(f"ud_pud/test/{lang}", sentences, [PUD_FILES[lang]], "test", key=_sentence_key)
              for lang, sentences in pud.items())
    log_examples(massive, "test")
    return data


def evaluate_checkpoint(path: Path, cfg: DictConfig, *, data: EvalData | None = None
                        ) -> tuple[dict[str, float], pd.DataFrame]:
    """Every intrinsic and extrinsic metric of one MLM checkpoint directory (``data``: :func:`eval_data`,
    read here when not given).

    Returns:
        ``(metrics, examples)``: the metrics of the module docstring, and the per-example rows of the
        mask-filling and XNLI probes (:mod:`atm.probes.examples`).

    Raises:
        AtmError: a checkpoint whose tokenizer does not match its model (naming the path), or bad ``eval``
            settings (see :func:`eval_data`).
    """
    data = data if data is not None else eval_data(cfg.eval)
    device = device_for(cfg.trainer)
    model, tokenizer = load_checkpoint(path)
    model.to(device).eval()
    seq = cfg.data.max_seq_len
    out = heldout_perplexities(model, tokenizer, cfg.data, cfg.eval.perplexity.max_lines_per_lang)
    for kind, texts in (("written", data.written), ("spoken", data.spoken)):
        out.update({f"eval/perplexity/{kind}/{lang}": mlm_perplexity(model, tokenizer, lines, seq)
                    for lang, lines in texts.items()})
    frames = []
    for probe, probes in (("noun", data.nouns), ("slot", data.slots)):
        metrics, examples = mask_fill_metrics(model, tokenizer, probes, seq, probe)
        out.update(metrics)
        frames.append(examples)
    metrics, examples = xnli_zero_shot(model, tokenizer, data.xnli, cfg.eval.xnli, cfg.trainer)
    out.update(metrics)
    return out, concat([*frames, examples])


# ------------------------------------------------------------------------------------------- tables


def _mask_fill_rows(score: str) -> list[tuple[str, str]]:
    """Rows of the mask-filling table of ``score`` (``accuracy``: top-1, ``top10``, ``mrr``)."""
    return [(rf"eval/mask_fill/spoken/([^/]+)/slot_{score}", r"spoken/\1"),
            (rf"eval/mask_fill/spoken/slot_{score}", "spoken/mean"),
            (rf"eval/mask_fill/([^/]+)/noun_{score}", r"written/\1"),
            (rf"eval/mask_fill/noun_{score}", "written/mean")]


#: Per-language tables: artifact name -> (metric key regex, row name template), first match wins.
TABLES = {
    "xnli": [(r"eval/xnli/([^/]+)/accuracy", r"\1"), (r"eval/xnli/avg_accuracy", "avg"),
             (r"eval/xnli/degenerate_languages", "degenerate languages")],
    "perplexity": [(r"eval/perplexity/(written|spoken)/([^/]+)", r"\1/\2"),
                   (r"eval/perplexity/written", "written/all (UD dev)"),
                   (r"eval/perplexity/spoken", "spoken/all (MASSIVE dev)")],
    "mask_fill": _mask_fill_rows("accuracy"),
    f"mask_fill_top{TOP_K}": _mask_fill_rows(f"top{TOP_K}"),
    "mask_fill_mrr": _mask_fill_rows("mrr"),
}
#: What a table shows instead of the accuracy of a degenerate XNLI probe (:func:`atm.probes.xnli.is_degenerate`).
DEGENERATE = "degenerate"


def language_table(rows: Sequence[dict], patterns: Sequence[tuple[str, str]]) -> list[dict]:
    """One row per language: ``{"language": name, "step <N>": value, ...}`` from per-checkpoint score dicts.

    Args:
        rows: ``{"step": N, <metric key>: value, ...}`` per checkpoint.
        patterns: ``(regex, template)``: a metric key that fully matches ``regex`` goes to the row named
            ``template`` expanded with the match (first matching pattern wins). Rows keep first-seen order.
    """
    table: dict[str, dict] = {}
    for scores in rows:
        for key, value in scores.items():
            for regex, template in patterns:
                if match := re.fullmatch(regex, key):
                    name = match.expand(template)
                    table.setdefault(name, {"language": name})[f"step {scores['step']}"] = value
                    break
    return list(table.values())


def xnli_table(rows: Sequence[dict]) -> list[dict]:
    """:func:`language_table` of XNLI accuracies in which the accuracy of a degenerate probe (metric
    ``eval/xnli/<lang>/degenerate`` = 1) reads :data:`DEGENERATE`, and so does ``avg`` when every language is
    degenerate; the last row counts the degenerate languages. Numbers are rounded to 4 decimals (a column
    mixing text and numbers is printed as text; the full values are in the metrics)."""
    table = language_table(rows, TABLES["xnli"])
    for scores in rows:
        column = f"step {scores['step']}"
        langs = [k.split("/")[2] for k in scores if re.fullmatch(r"eval/xnli/[^/]+/degenerate", k)]
        flagged = {lang for lang in langs if scores[f"eval/xnli/{lang}/degenerate"] == 1}
        if langs and len(flagged) == len(langs):
            flagged.add("avg")
        for row in table:
            if column in row:
                row[column] = DEGENERATE if row["language"] in flagged else round(row[column], 4)
    return table


def check(cfg: DictConfig) -> None:
    """Config-time validation of the ``eval`` settings this stage adds (before any input is trained).

    Raises:
        AtmError: naming the key: ``eval.checkpoints`` not ``final``/``all``, or a bad ``eval.xnli`` setting
            (:func:`atm.probes.xnli.check_xnli`), a per-language cap < 1, bad ``data`` values
            (:func:`atm.stages.common.check_data`).
    """
    check_data(cfg)
    if cfg.eval.checkpoints not in ("final", "all"):
        raise AtmError(f"eval.checkpoints={cfg.eval.checkpoints!r} must be 'final' or 'all'")
    for key in ("perplexity.max_lines_per_lang", "mask_fill.max_sentences_per_lang",
                "mask_fill.max_utterances_per_locale"):
        group, name = key.split(".")
        count_at_least((cfg.eval.get(group) or {}).get(name, 1), f"eval.{key}", nullable=True)
    check_xnli(cfg.eval.xnli)


@stage("evaluate", reads=("data", "eval"), artifact="evaluation", check=check)
def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Score the checkpoints of the ``target`` input; log metrics per checkpoint step, the per-example rows
    (``evaluation/examples/step-<N:06d>.csv``, :mod:`atm.probes.examples`) and the tables."""
    target = inputs["target"]
    mlflow.set_tags({"atm.evaluated_run_id": target.run_id or "", "atm.evaluated_stage": target.stage or "",
                     "atm.evaluated_path": str(target.path)})
    data = eval_data(cfg.eval)
    if target.run_id and cfg.eval.checkpoints == "all":
        checkpoints = [(step, tracking.download(target.run_id, artifact, cfg.tracking.cache_dir))
                       for step, artifact in tracking.list_checkpoints(target.run_id)]
    else:  # the final checkpoint, logged at its training step (0 for a checkpoint outside a run)
        checkpoints = [((tracking.final_step(target.run_id) or 0) if target.run_id else 0, target.path)]
    rows = []
    for step, path in tqdm(checkpoints, desc="evaluate checkpoints"):
        start = time.perf_counter()
        scores, examples = evaluate_checkpoint(path, cfg, data=data)
        scores["eval/checkpoint_seconds"] = time.perf_counter() - start
        mlflow.log_metrics(scores, step=step)
        mlflow.log_text(examples.to_csv(index=False), f"{EXAMPLES_DIR}/step-{step:06d}.csv")
        rows.append({"step": step, **scores})
    mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), "evaluation/checkpoints.csv")
    for name, patterns in TABLES.items():
        table = xnli_table(rows) if name == "xnli" else language_table(rows, patterns)
        if table:
            tracking.log_table(table, f"evaluation/{name}")
    return rows[-1]
