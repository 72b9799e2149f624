"""Stage ``finetune_xnli``: an XNLI pair classifier fine-tuned on English XNLI (Conneau et al. 2018).

The ``encoder`` input (default ``pretrain_stage2``) gets transformers' RoBERTa sequence-classification
head (:func:`atm.models.heads.build_pair_classifier`, 3 labels: entailment, neutral, contradiction) and is
trained with cross-entropy by the XNLI probe routine of ``evaluate`` (:mod:`atm.probes.xnli`:
:func:`~atm.probes.xnli.train_classifier` on the English sample :func:`~atm.probes.xnli.train_pairs` of
``seed`` -- ``eval.xnli.train_pairs`` pairs, null = all 9,000, encoded with ``eval.xnli.max_seq_len`` --
in length-grouped batches of ``trainer.batch_size``) for ``trainer.max_steps`` steps. It is scored zero-shot
on the labelled test sets of ``stage.languages`` (the first ``eval.xnli.max_test_pairs_per_lang`` pairs
each, null = all 5,010) by :func:`~atm.probes.xnli.evaluate_xnli`: ``eval/xnli/<lang>/accuracy`` with
``_se`` and the bootstrap interval ``_lo``/``_hi`` over test pairs, ``eval/xnli/<lang>/pred_share/<class>``,
``eval/xnli/<lang>/degenerate`` (1 when the classifier never predicts some class there),
``eval/xnli/avg_accuracy`` (with ``_lo``/``_hi``) and ``eval/xnli/degenerate_languages``. The classifier is
saved as ``checkpoint``; it is the teacher of ``distill_task`` with ``stage.task=xnli``.
"""

from __future__ import annotations

import mlflow
from omegaconf import DictConfig

from atm.errors import AtmError
from atm.models.tokenizer import load_tokenizer
from atm.probes.xnli import check_xnli, evaluate_xnli, pair_examples, train_classifier, train_pairs
from atm.stages.common import check_data, log_model
from atm.stages.registry import stage


def check(cfg: DictConfig) -> None:
    """Config-time validation (before the encoder is trained): the ``eval.xnli`` group
    (:func:`atm.probes.xnli.check_xnli`) and a non-empty ``stage.languages``.

    Raises:
        AtmError: naming the key.
    """
    check_data(cfg)
    check_xnli(cfg.eval.xnli)
    if not cfg.stage.languages:
        raise AtmError("stage.languages is empty; name at least one language with a labelled XNLI test set")


@stage("finetune_xnli", reads=("trainer", "data", "eval"), check=check, kinds=("classifier:xnli",))
def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Fine-tune a pair classifier over the ``encoder`` input on English XNLI; score ``stage.languages``."""
    path = inputs["encoder"].path
    tokenizer = load_tokenizer(path)
    pairs = train_pairs(cfg.eval.xnli, cfg.seed)
    mlflow.log_metric("data/train_examples", len(pairs))
    model, summary = train_classifier(path, tokenizer, pair_examples(tokenizer, pairs, cfg.eval.xnli.max_seq_len),
                                      cfg.trainer, cfg.seed, desc="finetune_xnli", log_metrics=True)
    results = evaluate_xnli(model, tokenizer, list(cfg.stage.languages), cfg.eval.xnli, detail=True)
    mlflow.log_metrics(results, step=cfg.trainer.max_steps)
    log_model(model, tokenizer, "checkpoint")
    return {**summary, **results}
