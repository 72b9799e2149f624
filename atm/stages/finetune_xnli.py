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

import mlflow
from omegaconf import DictConfig

from atm import metrics as M
from atm.data.collate import batch_stream
from atm.data.xnli import XnliPair, xnli_train
from atm.engine.loop import device_for, fit
from atm.models.heads import build_pair_classifier
from atm.models.tokenizer import load_tokenizer
from atm.stages.common import log_model
from atm.stages.evaluate import _pair_collator, _pair_examples, xnli_accuracies

#: The language XNLI classifiers are trained on (zero-shot transfer to the others).
TRAIN_LANGUAGE = "en"


def train_pairs(xnli_cfg: DictConfig, seed: int) -> list[XnliPair]:
    """The English training sample: a ``seed``-shuffled copy of the training set, first ``train_pairs``."""
    pairs = xnli_train(TRAIN_LANGUAGE)
    random.Random(seed).shuffle(pairs)
    return pairs[:xnli_cfg.train_pairs]


def pair_stream(tokenizer, pairs: list[XnliPair], max_seq_len: int, batch_size: int, seed: int):
    """Endless shuffled batches of ``pairs``: ``input_ids[B,T]`` (``<s> premise </s></s> hypothesis </s>``, at
    most ``max_seq_len`` sub-tokens), ``attention_mask[B,T]``, ``labels[B]``."""
    return batch_stream(_pair_examples(tokenizer, pairs, max_seq_len), batch_size, _pair_collator(tokenizer), seed)


def evaluate_xnli(model, tokenizer, languages, xnli_cfg: DictConfig, prefix: str = "eval/xnli") -> dict[str, float]:
    """Accuracy of a pair classifier on the first ``max_test_pairs_per_lang`` test pairs of each language
    (:func:`atm.stages.evaluate.xnli_accuracies`).

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
