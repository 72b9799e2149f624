"""Stage ``evaluate``: perplexity, mask-filling and XNLI zero-shot for every checkpoint of a run.

The ``target`` input names a training run (by role, ``runs:/<id>`` or a path). With
``eval.checkpoints=all`` each intermediate checkpoint (``checkpoints/step-<N>``) and the final one are
scored, and every metric is logged with ``step`` = the checkpoint's training step, which is what
``analysis/correlate_xnli.py`` correlates (AlexaTM, FitzGerald et al. KDD 2022, sec. 4.2, Table 3).

Metrics (fractions; perplexities in tokens, ``exp`` of the mean masked-token NLL in nats):

* ``eval/perplexity/written`` (UD dev sentences) and ``eval/perplexity/spoken`` (MASSIVE dev utterances),
  the held-out perplexities every MLM stage also logs; per language ``eval/perplexity/written/<lang>``
  (UD PUD sentences of ``eval.perplexity.written_languages``) and ``eval/perplexity/spoken/<locale>``
  (MASSIVE test utterances of ``eval.perplexity.spoken_locales``);
* written mask-filling ``eval/mask_fill/<lang>/noun_accuracy`` (UD PUD, words tagged NOUN) and the mean
  ``eval/mask_fill/noun_accuracy``; spoken mask-filling ``eval/mask_fill/spoken/<locale>/slot_accuracy``
  (MASSIVE test, the words inside slot spans) and the mean ``eval/mask_fill/spoken/slot_accuracy``. Both
  mask one word at a time -- all of its sub-tokens -- and count it recovered when the argmax at every one
  of its positions is the original sub-token (:func:`word_mask_fill`);
* XNLI zero-shot: fine-tune on English, test every language with a labelled test set
  (``eval/xnli/<lang>/accuracy``, ``..._se``, ``eval/xnli/avg_accuracy``; Conneau et al. 2018).

Tables (rows: language, columns: checkpoint step) are logged as ``evaluation/{xnli, perplexity,
mask_fill}.{csv,md}``, every metric of every checkpoint as ``evaluation/checkpoints.csv``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from atm import metrics as M
from atm import tracking
from atm.data import corpora
from atm.data.collate import EVAL_BATCH, batches, mlm_collator, tokenize_lines
from atm.data.massive import OUTSIDE
from atm.data.ud import pud_sentences
from atm.data.xnli import xnli_test_languages
from atm.engine.loop import device_for, fit, to_device
from atm.errors import AtmError
from atm.models.encoder import mlm_forward
from atm.models.heads import build_pair_classifier
from atm.stages.finetune import load_encoder, log_table, read_locales
from atm.stages.finetune_xnli import evaluate_xnli, pair_stream, train_pairs


@torch.no_grad()
def mlm_perplexity(model, tokenizer, lines: list[str], max_seq_len: int, seed: int = 0) -> float:
    """MLM perplexity ``exp(sum NLL / n)`` over the masked tokens of ``lines`` with a fixed-seed 15% masking
    (the same masks for every checkpoint, so values are comparable along a training run)."""
    examples = tokenize_lines(tokenizer, lines, max_seq_len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches(examples, EVAL_BATCH, mlm_collator(tokenizer, 0.15, seed=seed)):
        batch = to_device(batch, device)
        masked = batch["labels"] != -100
        logits = mlm_forward(model, batch["input_ids"], batch["attention_mask"], masked)["logits"]
        nll, n = M.masked_lm_nll(logits, batch["labels"][masked])
        total, count = total + nll, count + n
    return M.perplexity(total, count)


def heldout_perplexities(model, tokenizer, data_cfg: DictConfig, max_lines_per_lang: int) -> dict[str, float]:
    """``eval/perplexity/written`` (UD dev sentences) and ``eval/perplexity/spoken`` (MASSIVE dev utterances)."""
    written = [line.text for line in corpora.heldout_written(max_lines_per_lang)]
    spoken = [line.text for line in corpora.heldout_spoken(max_lines_per_lang)]
    return {"eval/perplexity/written": mlm_perplexity(model, tokenizer, written, data_cfg.max_seq_len),
            "eval/perplexity/spoken": mlm_perplexity(model, tokenizer, spoken, data_cfg.max_seq_len)}


# ------------------------------------------------------------------------------------ mask filling

#: A sentence to probe: its words and the indices of the words to mask, one at a time.
Probe = tuple[Sequence[str], Sequence[int]]


@torch.no_grad()
def word_mask_fill(model, tokenizer, probes: Sequence[Probe], max_seq_len: int) -> float:
    """Top-1 whole-word mask-filling accuracy (AlexaTM sec. 4.2, "mask filling").

    For every selected word of every probe, a copy of the sentence gets ``<mask>`` at ALL of that word's
    sub-tokens (the other words stay visible); the word counts as recovered when the argmax prediction at
    every one of its positions is the original sub-token (:func:`atm.metrics.mask_fill_accuracy` over
    tuples). Words cut off by truncation to ``max_seq_len`` sub-tokens are not scored.

    Args:
        probes: ``(words, indices of the words to mask)`` per sentence; the words are tokenized with
            ``is_split_into_words=True``.

    Returns:
        The fraction of masked words recovered; NaN when no word was masked.
    """
    items = []  # (input_ids, positions, targets)
    for words, selected in probes:
        enc = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=max_seq_len)
        word_ids = enc.word_ids()
        for w in selected:
            positions = [i for i, wid in enumerate(word_ids) if wid == w]
            if not positions:
                continue
            ids = list(enc["input_ids"])
            targets = [ids[i] for i in positions]
            for i in positions:
                ids[i] = tokenizer.mask_token_id
            items.append((ids, positions, targets))
    if not items:
        return float("nan")
    device = next(model.parameters()).device
    predicted, gold = [], []
    for start in range(0, len(items), EVAL_BATCH):
        chunk = items[start:start + EVAL_BATCH]
        padded = to_device(tokenizer.pad({"input_ids": [ids for ids, _, _ in chunk]}, return_tensors="pt"), device)
        masked = padded["input_ids"] == tokenizer.mask_token_id
        # argmax at the masked positions, row-major: the positions of each item in turn
        best = iter(mlm_forward(model, padded["input_ids"], padded["attention_mask"], masked)["logits"]
                    .argmax(-1).tolist())
        for _, positions, targets in chunk:
            predicted.append(tuple(next(best) for _ in positions))
            gold.append(tuple(targets))
    return M.mask_fill_accuracy(predicted, gold)


def noun_probes(lang: str, max_sentences: int) -> list[Probe]:
    """The first ``max_sentences`` UD PUD sentences of ``lang`` with their words tagged NOUN."""
    return [(sent.words, [w for w, tag in enumerate(sent.upos) if tag == "NOUN"])
            for sent in pud_sentences(lang)[:max_sentences]]


def slot_probes(examples) -> list[Probe]:
    """MASSIVE utterances with the words inside their slot spans (tag other than ``O``)."""
    return [(ex.words, [w for w, tag in enumerate(ex.slot_tags) if tag != OUTSIDE]) for ex in examples]


def noun_mask_fill(model, tokenizer, lang: str, max_sentences: int, max_seq_len: int) -> float:
    """Noun mask-filling accuracy on the first ``max_sentences`` UD PUD sentences of ``lang`` (AlexaTM sec.
    4.2): :func:`word_mask_fill` over every word tagged NOUN."""
    return word_mask_fill(model, tokenizer, noun_probes(lang, max_sentences), max_seq_len)


# ---------------------------------------------------------------------------------------------- XNLI


def xnli_zero_shot(checkpoint: Path, tokenizer, cfg: DictConfig, trainer_cfg: DictConfig, seed: int
                   ) -> dict[str, float]:
    """Fine-tune the checkpoint's encoder on English XNLI, test every language with a labelled test set
    (Conneau et al. 2018 zero-shot cross-lingual transfer).

    The classifier (:func:`atm.models.heads.build_pair_classifier`) trains on the same English sample as the
    ``finetune_xnli`` stage (:func:`atm.stages.finetune_xnli.train_pairs`) for ``cfg.epochs`` epochs.

    Args:
        cfg: the ``eval.xnli`` group; ``trainer_cfg``: the ``trainer`` group (device, precision, ...).

    Returns:
        :func:`atm.stages.finetune_xnli.evaluate_xnli`'s metrics: ``eval/xnli/<lang>/accuracy``,
        ``..._se`` and ``eval/xnli/avg_accuracy`` (fractions).
    """
    model = build_pair_classifier(checkpoint, num_labels=3).to(device_for(trainer_cfg))
    pairs = train_pairs(cfg, seed)
    steps = max(1, cfg.epochs * len(pairs) // cfg.batch_size)
    xnli_trainer = DictConfig({**trainer_cfg, "max_steps": steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
                               "warmup_steps": max(1, steps // 10), "save_every": None})
    fit(model, pair_stream(tokenizer, pairs, cfg.max_seq_len, cfg.batch_size, seed),
        lambda batch, step: (model(**batch).loss, {}), xnli_trainer, desc="xnli", log_metrics=False)
    return evaluate_xnli(model, tokenizer, xnli_test_languages(), cfg)


# ------------------------------------------------------------------------------------ evaluation data


@dataclass
class EvalData:
    """The per-language evaluation text, read once for every checkpoint of a run.

    Attributes:
        written: UD PUD sentence texts per language (written-form perplexity).
        spoken: MASSIVE test utterances per locale (spoken-form perplexity).
        nouns: noun probes per PUD language (written mask-filling).
        slots: slot-word probes per MASSIVE locale (spoken mask-filling).
    """

    written: dict[str, list[str]] = field(default_factory=dict)
    spoken: dict[str, list[str]] = field(default_factory=dict)
    nouns: dict[str, list[Probe]] = field(default_factory=dict)
    slots: dict[str, list[Probe]] = field(default_factory=dict)


def eval_data(eval_cfg: DictConfig) -> EvalData:
    """Read the text of every per-language probe of ``eval_cfg`` (the ``eval`` group).

    Raises:
        AtmError: naming the key: an unknown PUD language or MASSIVE locale, or one without test data.
    """
    ppl, fill = eval_cfg.perplexity, eval_cfg.mask_fill
    cap = ppl.max_lines_per_lang
    data = EvalData()
    for key, langs, fill_in in (
            ("eval.perplexity.written_languages", ppl.written_languages,
             lambda lang: data.written.__setitem__(lang, [s.text for s in pud_sentences(lang)[:cap]])),
            ("eval.mask_fill.languages", fill.languages,
             lambda lang: data.nouns.__setitem__(lang, noun_probes(lang, fill.max_sentences_per_lang)))):
        for lang in langs or []:
            try:
                fill_in(lang)
            except AtmError as err:
                raise AtmError(f"{key}: {err}") from None
    if ppl.spoken_locales:
        found = read_locales(list(ppl.spoken_locales), "test", "eval.perplexity.spoken_locales")
        data.spoken = {loc: [ex.utt for ex in examples[:cap]] for loc, examples in found.items()}
    if fill.spoken_locales:
        found = read_locales(list(fill.spoken_locales), "test", "eval.mask_fill.spoken_locales")
        data.slots = {loc: slot_probes(examples[:fill.max_utterances_per_locale]) for loc, examples in found.items()}
    return data


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def evaluate_checkpoint(path: Path, cfg: DictConfig, *, data: EvalData | None = None) -> dict[str, float]:
    """Every intrinsic and extrinsic metric of one MLM checkpoint directory (``data``: :func:`eval_data`,
    read here when not given).

    Raises:
        AtmError: a checkpoint whose tokenizer does not match its model (naming the path), or bad ``eval``
            settings (see :func:`eval_data`).
    """
    data = data if data is not None else eval_data(cfg.eval)
    device = device_for(cfg.trainer)
    model, tokenizer = load_encoder(path)
    model.to(device).eval()
    seq = cfg.data.max_seq_len
    out = heldout_perplexities(model, tokenizer, cfg.data, cfg.eval.perplexity.max_lines_per_lang)
    for kind, texts in (("written", data.written), ("spoken", data.spoken)):
        out.update({f"eval/perplexity/{kind}/{lang}": mlm_perplexity(model, tokenizer, lines, seq)
                    for lang, lines in texts.items()})
    nouns = {lang: word_mask_fill(model, tokenizer, probes, seq) for lang, probes in data.nouns.items()}
    out.update({f"eval/mask_fill/{lang}/noun_accuracy": acc for lang, acc in nouns.items()})
    if nouns:
        out["eval/mask_fill/noun_accuracy"] = _mean(nouns)
    slots = {loc: word_mask_fill(model, tokenizer, probes, seq) for loc, probes in data.slots.items()}
    out.update({f"eval/mask_fill/spoken/{loc}/slot_accuracy": acc for loc, acc in slots.items()})
    if slots:
        out["eval/mask_fill/spoken/slot_accuracy"] = _mean(slots)
    out.update(xnli_zero_shot(path, tokenizer, cfg.eval.xnli, cfg.trainer, cfg.seed))
    return out


# ------------------------------------------------------------------------------------------- tables

#: Per-language tables: artifact name -> (metric key regex, row name template), first match wins.
TABLES = {
    "xnli": [(r"eval/xnli/([^/]+)/accuracy", r"\1"), (r"eval/xnli/avg_accuracy", "avg")],
    "perplexity": [(r"eval/perplexity/(written|spoken)/([^/]+)", r"\1/\2"),
                   (r"eval/perplexity/written", "written/all (UD dev)"),
                   (r"eval/perplexity/spoken", "spoken/all (MASSIVE dev)")],
    "mask_fill": [(r"eval/mask_fill/spoken/([^/]+)/slot_accuracy", r"spoken/\1"),
                  (r"eval/mask_fill/spoken/slot_accuracy", "spoken/mean"),
                  (r"eval/mask_fill/([^/]+)/noun_accuracy", r"written/\1"),
                  (r"eval/mask_fill/noun_accuracy", "written/mean")],
}


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


def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Score the checkpoints of the ``target`` input; log metrics per checkpoint step and the tables."""
    target = inputs["target"]
    mlflow.set_tags({"atm.evaluated_run_id": target.run_id or "", "atm.evaluated_stage": target.stage or "",
                     "atm.evaluated_path": str(target.path)})
    data = eval_data(cfg.eval)
    if target.run_id and cfg.eval.checkpoints == "all":
        checkpoints = [(step, tracking.download(target.run_id, artifact, cfg.tracking.cache_dir))
                       for step, artifact in tracking.list_checkpoints(target.run_id)]
    else:
        checkpoints = [(0, target.path)]
    rows = []
    for step, path in tqdm(checkpoints, desc="evaluate checkpoints"):
        scores = evaluate_checkpoint(path, cfg, data=data)
        mlflow.log_metrics(scores, step=step)
        rows.append({"step": step, **scores})
    import pandas as pd

    mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), "evaluation/checkpoints.csv")
    for name, patterns in TABLES.items():
        table = language_table(rows, patterns)
        if table:
            log_table(table, f"evaluation/{name}")
    return rows[-1]
