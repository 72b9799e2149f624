"""Stage ``train_tokenizer``: a SentencePiece unigram vocabulary over Stage-1 + Stage-2 text."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from atm import tracking
from atm.data import corpora
from atm.errors import AtmError
from atm.models.tokenizer import tokenizer_stats, train_tokenizer
from atm.stages.common import check_data, count_at_least
from atm.stages.registry import stage


def check(cfg: DictConfig) -> None:
    """Config-time validation of the ``tokenizer`` group and the data caps it reads.

    Raises:
        AtmError: naming the key: ``tokenizer.vocab_size`` < 16 (the special tokens and a few pieces),
            ``tokenizer.character_coverage`` not in (0, 1], ``tokenizer.max_lines_per_source`` not null or >= 1,
            bad ``data`` values (:func:`atm.stages.common.check_data`).
    """
    check_data(cfg)
    count_at_least(cfg.tokenizer.vocab_size, "tokenizer.vocab_size", 16)
    coverage = cfg.tokenizer.character_coverage
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float)) or not 0 < coverage <= 1:
        raise AtmError(f"tokenizer.character_coverage={coverage!r} must be a number in (0, 1]")
    count_at_least(cfg.tokenizer.max_lines_per_source, "tokenizer.max_lines_per_source", nullable=True)


@stage("train_tokenizer", reads=("tokenizer", "data"), artifact="tokenizer", aliases=("tokenizer",), check=check)
def run(cfg: DictConfig, inputs: dict) -> dict[str, float]:
    """Train the tokenizer; log it (artifact ``tokenizer``) and, per language of the held-out text, the split
    ratio (sub-tokens per word) and the unknown-token portion."""
    cap = cfg.tokenizer.max_lines_per_source
    lines = [line for kind in corpora.KINDS for line in corpora.tokenizer_lines(kind, cfg.data, cap, cfg.seed)]
    mlflow.log_metric("data/tokenizer_lines", len(lines))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tokenizer"
        tokenizer = train_tokenizer(lines, out, cfg.tokenizer.vocab_size, seed=cfg.seed,
                                    character_coverage=cfg.tokenizer.character_coverage)
        tracking.log_checkpoint(out, "tokenizer")
    per_lang = cfg.data.heldout.max_lines_per_lang
    heldout = corpora.heldout_written(per_lang) + corpora.heldout_spoken(per_lang)
    stats = tokenizer_stats(tokenizer, ((line.lang, line.text) for line in heldout))
    metrics = {f"tokenizer/{lang}/{k}": v for lang, s in stats.items() for k, v in s.items() if k != "n_words"}
    mlflow.log_metrics(metrics)
    mlflow.log_dict(stats, "tokenizer_stats.json")
    summary = {"tokenizer/vocab_size": float(len(tokenizer)),
               "tokenizer/avg_split_ratio": sum(s["split_ratio"] for s in stats.values()) / len(stats),
               "tokenizer/avg_unk_portion": sum(s["unk_portion"] for s in stats.values()) / len(stats)}
    mlflow.log_metrics(summary)
    return summary
