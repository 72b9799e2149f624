"""Stage ``evaluate``: perplexity, noun mask-filling and XNLI zero-shot for every checkpoint of a run.

The ``target`` input names a training run (by role, ``runs:/<id>`` or a path). With
``eval.checkpoints=all`` each intermediate checkpoint (``checkpoints/step-<N>``) and the final one are
scored, and every metric is logged with ``step`` = the checkpoint's training step, which is what
``analysis/correlate_xnli.py`` correlates (AlexaTM sec. 4.2, Table 3).

Metrics: ``eval/perplexity/{written,spoken}``, ``eval/mask_fill/<lang>/noun_accuracy`` and their mean
``eval/mask_fill/noun_accuracy``, ``eval/xnli/<lang>/accuracy`` and ``eval/xnli/avg_accuracy``.
"""

from __future__ import annotations

import random
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from atm import metrics as M
from atm import tracking
from atm.data import corpora
from atm.data.collate import batches, mlm_collator, tokenize_lines
from atm.data.ud import pud_sentences
from atm.data.xnli import xnli_test, xnli_test_languages, xnli_train
from atm.engine.loop import device_for, fit, to_device
from atm.data.collate import batch_stream
from atm.models.encoder import load_mlm, mlm_forward
from atm.models.heads import build_pair_classifier
from atm.models.tokenizer import load_tokenizer

EVAL_BATCH = 64


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


@torch.no_grad()
def noun_mask_fill(model, tokenizer, lang: str, max_sentences: int, max_seq_len: int) -> float:
    """Top-1 accuracy of recovering a masked noun in UD PUD sentences of ``lang`` (AlexaTM sec. 4.2).

    Each word tagged NOUN is masked on its own (all its sub-tokens become ``<mask>``); it counts as
    recovered when the argmax prediction at every one of its positions is the original sub-token.
    """
    items = []  # (input_ids, positions, targets)
    for sent in pud_sentences(lang)[:max_sentences]:
        enc = tokenizer(list(sent.words), is_split_into_words=True, truncation=True, max_length=max_seq_len)
        word_ids = enc.word_ids()
        for w, tag in enumerate(sent.upos):
            positions = [i for i, wid in enumerate(word_ids) if wid == w]
            if tag != "NOUN" or not positions:
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


def xnli_zero_shot(checkpoint: Path, tokenizer, cfg: DictConfig, trainer_cfg: DictConfig, seed: int
                   ) -> dict[str, float]:
    """Fine-tune the checkpoint's encoder on English XNLI, test every language with a labelled test set.

    Returns ``{lang: accuracy}`` (Conneau et al. 2018 zero-shot cross-lingual transfer).
    """
    device = device_for(trainer_cfg)
    model = build_pair_classifier(checkpoint, num_labels=3).to(device)
    pairs = xnli_train("en")
    random.Random(seed).shuffle(pairs)
    examples = _pair_examples(tokenizer, pairs[:cfg.train_pairs], cfg.max_seq_len)
    steps = max(1, cfg.epochs * len(examples) // cfg.batch_size)
    xnli_trainer = DictConfig({**trainer_cfg, "max_steps": steps, "lr": cfg.lr, "batch_size": cfg.batch_size,
                               "warmup_steps": max(1, steps // 10), "save_every": None})
    fit(model, batch_stream(examples, cfg.batch_size, _pair_collator(tokenizer), seed),
        lambda batch, step: (model(**batch).loss, {}), xnli_trainer, desc="xnli", log_metrics=False)
    accuracy = {}
    with torch.no_grad():
        for lang in xnli_test_languages():
            test = _pair_examples(tokenizer, xnli_test(lang)[:cfg.max_test_pairs_per_lang], cfg.max_seq_len)
            predicted, gold = [], []
            for batch in batches(test, EVAL_BATCH, _pair_collator(tokenizer)):
                batch = to_device(batch, device)
                predicted += model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                                   ).logits.argmax(-1).tolist()
                gold += batch["labels"].tolist()
            accuracy[lang] = M.intent_accuracy(predicted, gold)
    return accuracy


def _pair_examples(tokenizer, pairs, max_seq_len: int) -> list[dict]:
    enc = tokenizer([p.premise for p in pairs], [p.hypothesis for p in pairs], truncation=True,
                    max_length=max_seq_len)
    return [{"input_ids": ids, "labels": p.label} for ids, p in zip(enc["input_ids"], pairs)]


def _pair_collator(tokenizer):
    def collate(items):
        batch = tokenizer.pad({"input_ids": [x["input_ids"] for x in items]}, return_tensors="pt")
        batch["labels"] = torch.tensor([x["labels"] for x in items])
        return batch

    return collate


def evaluate_checkpoint(path: Path, cfg: DictConfig) -> dict[str, float]:
    """Every intrinsic and extrinsic metric of one MLM checkpoint directory."""
    device = device_for(cfg.trainer)
    tokenizer = load_tokenizer(path)
    model = load_mlm(path).to(device).eval()
    out = heldout_perplexities(model, tokenizer, cfg.data, cfg.eval.perplexity.max_lines_per_lang)
    fills = {lang: noun_mask_fill(model, tokenizer, lang, cfg.eval.mask_fill.max_sentences_per_lang,
                                  cfg.data.max_seq_len) for lang in cfg.eval.mask_fill.languages}
    out.update({f"eval/mask_fill/{lang}/noun_accuracy": acc for lang, acc in fills.items()})
    out["eval/mask_fill/noun_accuracy"] = sum(fills.values()) / len(fills)
    xnli = xnli_zero_shot(path, tokenizer, cfg.eval.xnli, cfg.trainer, cfg.seed)
    out.update({f"eval/xnli/{lang}/accuracy": acc for lang, acc in xnli.items()})
    out["eval/xnli/avg_accuracy"] = sum(xnli.values()) / len(xnli)
    return out


def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Score the checkpoints of the ``target`` input; log metrics per checkpoint step and a CSV table."""
    target = inputs["target"]
    mlflow.set_tags({"atm.evaluated_run_id": target.run_id or "", "atm.evaluated_stage": target.stage or "",
                     "atm.evaluated_path": str(target.path)})
    if target.run_id and cfg.eval.checkpoints == "all":
        checkpoints = [(step, tracking.download(target.run_id, artifact, cfg.tracking.cache_dir))
                       for step, artifact in tracking.list_checkpoints(target.run_id)]
    else:
        checkpoints = [(0, target.path)]
    rows = []
    for step, path in tqdm(checkpoints, desc="evaluate checkpoints"):
        scores = evaluate_checkpoint(path, cfg)
        mlflow.log_metrics(scores, step=step)
        rows.append({"step": step, **scores})
    import pandas as pd

    mlflow.log_text(pd.DataFrame(rows).to_csv(index=False), "evaluation/checkpoints.csv")
    return rows[-1]
