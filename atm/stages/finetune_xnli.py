"""Stage ``finetune_xnli``: an XNLI pair classifier fine-tuned on English XNLI (Conneau et al. 2018).

The ``encoder`` input (default ``pretrain_stage2``) gets transformers' RoBERTa sequence-classification
head (:func:`atm.models.heads.build_pair_classifier`, 3 labels: entailment, neutral, contradiction) and is
trained with cross-entropy on the same English sample as the XNLI probe of ``evaluate``
(:func:`train_pairs`: a seeded shuffle of the 9,000-pair English training set cut to
``eval.xnli.train_pairs``, encoded with ``eval.xnli.max_seq_len``) for ``trainer.max_steps`` steps. It is
scored zero-shot on the labelled test sets of ``stage.languages`` (at most ``eval.xnli.max_test_pairs_per_lang``
pairs each): ``eval/xnli/<lang>/accuracy`` and their mean ``eval/xnli/avg_accuracy``. The classifier is
saved as ``checkpoint``; it is the teacher of ``distill_task`` with ``stage.task=xnli``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import mlflow
import torch
from omegaconf import DictConfig

from atm import metrics as M
from atm.data.collate import EVAL_BATCH, batch_stream, batches
from atm.data.xnli import XnliPair, xnli_test, xnli_train
from atm.engine.loop import device_for, fit, to_device
from atm.models.heads import build_pair_classifier
from atm.models.tokenizer import load_tokenizer
from atm.stages.common import log_model

#: The language XNLI classifiers are trained on (zero-shot transfer to the others).
TRAIN_LANGUAGE = "en"


def train_pairs(xnli_cfg: DictConfig, seed: int) -> list[XnliPair]:
    """The English training sample: a ``seed``-shuffled copy of the training set, first ``train_pairs``."""
    pairs = xnli_train(TRAIN_LANGUAGE)
    random.Random(seed).shuffle(pairs)
    return pairs[:xnli_cfg.train_pairs]


def pair_examples(tokenizer, pairs: Sequence[XnliPair], max_seq_len: int) -> list[dict]:
    """``{"input_ids": <s> premise </s></s> hypothesis </s> (at most max_seq_len sub-tokens), "labels": 0|1|2}``
    per pair."""
    enc = tokenizer([p.premise for p in pairs], [p.hypothesis for p in pairs], truncation=True,
                    max_length=max_seq_len)
    return [{"input_ids": ids, "labels": p.label} for ids, p in zip(enc["input_ids"], pairs)]


def pair_collator(tokenizer):
    """Pads :func:`pair_examples` items into ``input_ids[B,T]``, ``attention_mask[B,T]``, ``labels[B]``."""
    def collate(items):
        batch = tokenizer.pad({"input_ids": [x["input_ids"] for x in items]}, return_tensors="pt")
        batch["labels"] = torch.tensor([x["labels"] for x in items])
        return batch

    return collate


def pair_stream(tokenizer, pairs: list[XnliPair], max_seq_len: int, batch_size: int, seed: int):
    """Endless shuffled batches of ``pairs`` (:func:`pair_collator`)."""
    return batch_stream(pair_examples(tokenizer, pairs, max_seq_len), batch_size, pair_collator(tokenizer), seed)


@torch.no_grad()
def xnli_accuracies(model, tokenizer, languages: Sequence[str], xnli_cfg: DictConfig) -> dict[str, tuple[float, int]]:
    """``{lang: (accuracy, n)}`` of a pair classifier on the first ``max_test_pairs_per_lang`` labelled test
    pairs of each language (``xnli_cfg``: the ``eval.xnli`` group).

    Raises:
        AtmError: a language without a labelled test set (see :func:`atm.data.xnli.xnli_test`).
    """
    device = next(model.parameters()).device
    model.eval()
    out = {}
    for lang in languages:
        test = pair_examples(tokenizer, xnli_test(lang)[:xnli_cfg.max_test_pairs_per_lang], xnli_cfg.max_seq_len)
        predicted, gold = [], []
        for batch in batches(test, EVAL_BATCH, pair_collator(tokenizer)):
            batch = to_device(batch, device)
            predicted += model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                               ).logits.argmax(-1).tolist()
            gold += batch["labels"].tolist()
        out[lang] = (M.intent_accuracy(predicted, gold), len(gold))
    return out


def evaluate_xnli(model, tokenizer, languages, xnli_cfg: DictConfig, prefix: str = "eval/xnli") -> dict[str, float]:
    """Accuracy of a pair classifier on the first ``max_test_pairs_per_lang`` test pairs of each language
    (:func:`xnli_accuracies`), with its standard error ``sqrt(p(1-p)/n)``.

    Returns ``{<prefix>/<lang>/accuracy, <prefix>/<lang>/accuracy_se, <prefix>/avg_accuracy}`` (fractions).

    Raises:
        AtmError: a language without a labelled test set (see :func:`atm.data.xnli.xnli_test`).
    """
    results: dict[str, float] = {}
    for lang, (accuracy, n) in xnli_accuracies(model, tokenizer, list(languages), xnli_cfg).items():
        results[f"{prefix}/{lang}/accuracy"] = accuracy
        results[f"{prefix}/{lang}/accuracy_se"] = M.standard_error(accuracy, n)
    results[f"{prefix}/avg_accuracy"] = sum(results[f"{prefix}/{lang}/accuracy"] for lang in languages) / len(languages)
    return results


def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Fine-tune a pair classifier over the ``encoder`` input on English XNLI; score ``stage.languages``."""
    path = inputs["encoder"].path
    tokenizer = load_tokenizer(path)
    model = build_pair_classifier(path, num_labels=3).to(device_for(cfg.trainer))
    pairs = train_pairs(cfg.eval.xnli, cfg.seed)
    mlflow.log_metric("data/train_examples", len(pairs))
    stream = pair_stream(tokenizer, pairs, cfg.eval.xnli.max_seq_len, cfg.trainer.batch_size, cfg.seed)
    summary = fit(model, stream, lambda batch, step: (model(**batch).loss, {}), cfg.trainer, desc="finetune_xnli")
    results = evaluate_xnli(model, tokenizer, list(cfg.stage.languages), cfg.eval.xnli)
    mlflow.log_metrics(results, step=cfg.trainer.max_steps)
    log_model(model, tokenizer, "checkpoint")
    return {**summary, **results}
