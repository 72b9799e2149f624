"""Models: SentencePiece tokenizers, pre-LN RoBERTa MLM encoders (presets in ``conf/model``), task heads.

See :mod:`atm.models.tokenizer`, :mod:`atm.models.encoder` and :mod:`atm.models.heads`.  Names are
imported lazily (PEP 562), so ``import atm.models`` does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # tokenizer
    "SPECIAL_TOKENS": "tokenizer",
    "check_compatible": "tokenizer",
    "load_tokenizer": "tokenizer",
    "tokenizer_stats": "tokenizer",
    "train_tokenizer": "tokenizer",
    # encoder
    "PRESET_KEYS": "encoder",
    "build_mlm": "encoder",
    "check_max_seq_len": "encoder",
    "count_parameters": "encoder",
    "list_presets": "encoder",
    "load_checkpoint": "encoder",
    "load_mlm": "encoder",
    "load_preset": "encoder",
    "make_config": "encoder",
    "model_conf_dir": "encoder",
    "required_positions": "encoder",
    "save_checkpoint": "encoder",
    # heads
    "IGNORE_INDEX": "heads",
    "POOLINGS": "heads",
    "XNLI_LABELS": "heads",
    "JointIntentSlotConfig": "heads",
    "JointIntentSlotModel": "heads",
    "JointIntentSlotOutput": "heads",
    "align_word_labels": "heads",
    "build_pair_classifier": "heads",
    "encoder_config_kwargs": "heads",
    "load_joint_model": "heads",
    "load_pair_classifier": "heads",
    "word_predictions": "heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'atm.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"atm.models.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from atm.models.encoder import (  # noqa: F401
        PRESET_KEYS, build_mlm, check_max_seq_len, count_parameters, list_presets, load_checkpoint,
        load_mlm, load_preset, make_config, model_conf_dir, required_positions, save_checkpoint,
    )
    from atm.models.heads import (  # noqa: F401
        IGNORE_INDEX, POOLINGS, XNLI_LABELS, JointIntentSlotConfig, JointIntentSlotModel,
        JointIntentSlotOutput, align_word_labels, build_pair_classifier, encoder_config_kwargs,
        load_joint_model, load_pair_classifier, word_predictions,
    )
    from atm.models.tokenizer import (  # noqa: F401
        SPECIAL_TOKENS, check_compatible, load_tokenizer, tokenizer_stats,
        train_tokenizer,
    )
