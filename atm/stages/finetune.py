"""Stage ``finetune``: joint intent classification + slot filling on MASSIVE (FitzGerald et al. 2022).

The ``encoder`` input (any atm MLM checkpoint) gets an intent head and a slot head; slot labels sit on
each word's first sub-token. Per evaluation locale it logs ``eval/massive/<locale>/{intent_accuracy,
slot_f1, exact_match}`` with standard errors, their averages ``eval/massive/avg/...``, and writes the
predictions as ``predictions/<locale>.jsonl``.
"""

from __future__ import annotations

import json
import random

import mlflow
import torch
from omegaconf import DictConfig

from atm import metrics as M
from atm.data.collate import batch_stream
from atm.data.massive import intent_labels, read_massive, slot_labels
from atm.engine.loop import device_for, fit, to_device
from atm.models.heads import JointIntentSlotModel, align_word_labels, word_predictions
from atm.models.tokenizer import load_tokenizer
from atm.stages.common import log_model


def encode(tokenizer, examples, intents: list[str], slots: list[str], max_seq_len: int) -> list[dict]:
    """Tokenize MASSIVE examples: ``input_ids``, ``intent`` id, ``slot_labels`` on first sub-tokens (-100
    elsewhere) and the ``word_ids`` needed to read word-level predictions back."""
    intent_id = {name: i for i, name in enumerate(intents)}
    slot_id = {name: i for i, name in enumerate(slots)}
    out = []
    for ex in examples:
        enc = tokenizer(list(ex.words), is_split_into_words=True, truncation=True, max_length=max_seq_len)
        word_ids = enc.word_ids()
        out.append({"input_ids": enc["input_ids"], "word_ids": word_ids,
                    "intent": intent_id[ex.intent],
                    "slot_labels": align_word_labels(word_ids, [slot_id[t] for t in ex.slot_tags])})
    return out


def collator(tokenizer):
    """Pad a batch of :func:`encode` items: ``input_ids[B,T]``, ``attention_mask``, ``intent_labels[B]``,
    ``slot_labels[B,T]`` (-100 on padding)."""

    def collate(items):
        batch = tokenizer.pad({"input_ids": [x["input_ids"] for x in items]}, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        batch["intent_labels"] = torch.tensor([x["intent"] for x in items])
        batch["slot_labels"] = torch.tensor([x["slot_labels"] + [-100] * (width - len(x["slot_labels"]))
                                             for x in items])
        return batch

    return collate


@torch.no_grad()
def predict(model, tokenizer, encoded: list[dict], intents: list[str], slots: list[str]):
    """Word-level predictions: ``(intent names, BIO tag sequences)``, one per example."""
    device = next(model.parameters()).device
    pred_intents, pred_tags = [], []
    for start in range(0, len(encoded), 64):
        chunk = encoded[start:start + 64]
        batch = to_device(collator(tokenizer)(chunk), device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        pred_intents += [intents[i] for i in out.intent_logits.argmax(-1).tolist()]
        token_pred = out.slot_logits.argmax(-1).tolist()
        for item, row in zip(chunk, token_pred):
            pred_tags.append([slots[i] for i in word_predictions(item["word_ids"], row[:len(item["word_ids"])])])
    return pred_intents, pred_tags


def score_locale(model, tokenizer, examples, intents, slots, max_seq_len: int) -> tuple[dict, list[dict]]:
    """Intent accuracy, slot micro-F1 (seqeval) and exact match with standard errors, plus predictions."""
    encoded = encode(tokenizer, examples, intents, slots, max_seq_len)
    pred_intents, pred_tags = predict(model, tokenizer, encoded, intents, slots)
    gold_intents = [ex.intent for ex in examples]
    gold_tags = [list(ex.slot_tags) for ex in examples]
    # predictions for words cut off by truncation are "O"
    pred_tags = [p + ["O"] * (len(g) - len(p)) for p, g in zip(pred_tags, gold_tags)]
    n = len(examples)
    scores = {"intent_accuracy": M.intent_accuracy(pred_intents, gold_intents),
              "slot_f1": M.slot_f1(pred_tags, gold_tags),
              "exact_match": M.exact_match(pred_intents, gold_intents, pred_tags, gold_tags)}
    scores.update({f"{k}_se": M.standard_error(v, n) for k, v in list(scores.items())})
    rows = [{"id": ex.id, "utt": ex.utt, "intent": ex.intent, "pred_intent": pi, "slots": list(ex.slot_tags),
             "pred_slots": pt} for ex, pi, pt in zip(examples, pred_intents, pred_tags)]
    return scores, rows


SCORES = ("intent_accuracy", "slot_f1", "exact_match")


def train_examples(ft: DictConfig, seed: int) -> list:
    """The training sample: per locale of ``finetune.locales``, a seeded shuffle of its train partition cut
    to ``finetune.max_train_per_locale``."""
    train = []
    for locale in ft.locales:
        examples = read_massive([locale], ["train"])
        random.Random(seed).shuffle(examples)
        train += examples[:ft.max_train_per_locale]
    return train


def evaluate_massive(model, tokenizer, ft: DictConfig, intents: list[str], slots: list[str], max_seq_len: int,
                     prefix: str = "eval/massive", log_predictions: bool = True) -> dict[str, float]:
    """:func:`score_locale` on every locale of ``finetune.eval_locales`` (``finetune.eval_split``, at most
    ``max_eval_per_locale`` utterances): ``<prefix>/<locale>/<score>`` and the means over locales
    ``<prefix>/avg/<score>``; predictions are logged as ``predictions/<locale>.jsonl``."""
    results: dict[str, float] = {}
    for locale in ft.eval_locales:
        examples = read_massive([locale], [ft.eval_split])[:ft.max_eval_per_locale]
        scores, rows = score_locale(model, tokenizer, examples, intents, slots, max_seq_len)
        results.update({f"{prefix}/{locale}/{k}": v for k, v in scores.items()})
        if log_predictions:
            mlflow.log_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                            f"predictions/{locale}.jsonl")
    for key in SCORES:
        results[f"{prefix}/avg/{key}"] = sum(results[f"{prefix}/{loc}/{key}"]
                                             for loc in ft.eval_locales) / len(ft.eval_locales)
    return results


def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Fine-tune on ``finetune.locales`` (train partition), evaluate ``finetune.eval_locales``."""
    ft = cfg.finetune
    path = inputs["encoder"].path
    tokenizer = load_tokenizer(path)
    intents, slots = intent_labels(), slot_labels()
    model = JointIntentSlotModel.from_encoder(path, intents, slots, pooling=ft.pooling,
                                              slot_loss_coef=ft.slot_loss_coef, freeze_encoder=ft.freeze_encoder)
    model.to(device_for(cfg.trainer))
    stream = batch_stream(encode(tokenizer, train_examples(ft, cfg.seed), intents, slots, cfg.data.max_seq_len),
                          cfg.trainer.batch_size, collator(tokenizer), cfg.seed)
    summary = fit(model, stream, lambda batch, step: (model(**batch).loss, {}), cfg.trainer, desc="finetune")
    results = evaluate_massive(model, tokenizer, ft, intents, slots, cfg.data.max_seq_len)
    mlflow.log_metrics(results, step=cfg.trainer.max_steps)
    log_model(model, tokenizer, "checkpoint")
    return {**summary, **results}
