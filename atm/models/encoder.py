"""Pre-LayerNorm RoBERTa encoders for MLM: presets, construction, parameter counts, checkpoints.

AlexaTM teachers and students (FitzGerald et al., KDD 2022) are RoBERTa encoders (Liu et al., 2019)
with the LayerNorm moved in front of each sub-layer (pre-LN; Xiong et al., 2020), which transformers
implements as ``RobertaPreLayerNormForMaskedLM``.  Model shapes are Hydra presets in ``conf/model/``
(group ``model``): flat mappings of ``RobertaPreLayerNormConfig`` keyword arguments plus ``name``.
Everything that depends on the tokenizer (``vocab_size``, pad/bos/eos ids) is taken from the tokenizer
when the model is built, never from the preset.

Checkpoints are ordinary Hugging Face directories (``config.json``, ``model.safetensors`` and the
tokenizer files) written atomically by :func:`save_checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from atm.errors import AtmError
from atm.files import atomic_dir
from atm.models.tokenizer import (
    SPM_MODEL_FILE,
    TRAINING_ARGS_FILE,
    _check_special_ids,
    check_compatible,
    load_tokenizer,
)

__all__ = [
    "PRESET_KEYS",
    "mlm_forward",
    "build_mlm",
    "check_max_seq_len",
    "count_parameters",
    "list_presets",
    "load_checkpoint",
    "load_mlm",
    "load_preset",
    "make_config",
    "model_conf_dir",
    "required_positions",
    "save_checkpoint",
    "training_dropout",
]

#: Keys a model preset may set (besides ``name``), all ``RobertaPreLayerNormConfig`` arguments.
PRESET_KEYS: frozenset[str] = frozenset(
    {
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "hidden_act",
        "layer_norm_eps",
        "initializer_range",
        "classifier_dropout",
    }
)
_INT_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings")
_PROB_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
#: Keys that come from the tokenizer (or are fixed) and so must not appear in a preset.
_FROM_TOKENIZER = frozenset({"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "type_vocab_size"})
#: Parameter names (suffixes) counted as embedding parameters by :func:`count_parameters`.
_EMBEDDING_PARAMS = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "lm_head.bias",
    "lm_head.decoder.bias",
)


# --------------------------------------------------------------------------------------------- presets


def model_conf_dir() -> Path:
    """The ``conf/model`` directory of this repository (Hydra config group ``model``)."""
    return Path(__file__).resolve().parents[2] / "conf" / "model"


def list_presets(conf_dir: str | os.PathLike | None = None) -> list[str]:
    """Names of the model presets (``*.yaml`` files) in ``conf_dir`` (default :func:`model_conf_dir`)."""
    d = Path(conf_dir) if conf_dir is not None else model_conf_dir()
    return sorted(p.stem for p in d.glob("*.yaml"))


def load_preset(name: str, conf_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read model preset ``name`` from ``conf_dir`` (default :func:`model_conf_dir`) as a plain dict.

    Hydra users get the same mapping as ``cfg.model``; this is for code and tests outside Hydra.

    Raises:
        AtmError: no such preset (the message lists the available ones), or the file is not a mapping.
    """
    import yaml

    d = Path(conf_dir) if conf_dir is not None else model_conf_dir()
    path = d / f"{name}.yaml"
    if not path.is_file():
        raise AtmError(f"unknown model preset {name!r} (in {d}: {', '.join(list_presets(d)) or 'none'})")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise AtmError(f"{path}: a model preset must be a mapping")
    _validate_preset(data, str(path))
    return data


def _validate_preset(model_cfg: Mapping, where: str) -> dict[str, Any]:
    """Check keys and value types of a preset; return its config kwargs (without ``name``)."""
    if not isinstance(model_cfg, Mapping):
        raise AtmError(f"{where}: model config must be a mapping, got {type(model_cfg).__name__}")
    kwargs: dict[str, Any] = {}
    for key in model_cfg:
        if key == "name":
            continue
        if key in _FROM_TOKENIZER:
            raise AtmError(f"{where}: model key {key!r} must not be set in a preset (it comes from the tokenizer)")
        if key not in PRESET_KEYS:
            raise AtmError(f"{where}: unknown model key {key!r} (allowed: name, {', '.join(sorted(PRESET_KEYS))})")
        kwargs[key] = model_cfg[key]
    for key in _INT_KEYS:
        if key not in kwargs:
            raise AtmError(f"{where}: model key {key!r} is missing")
        v = kwargs[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise AtmError(f"{where}: model key {key!r} must be a positive integer, got {v!r}")
    for key in _PROB_KEYS:
        v = kwargs.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise AtmError(f"{where}: model key {key!r} must be a probability in [0, 1), got {v!r}")
        kwargs[key] = float(v)
    for key in ("layer_norm_eps", "initializer_range"):
        if key in kwargs:
            v = kwargs[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise AtmError(f"{where}: model key {key!r} must be a positive number, got {v!r}")
            kwargs[key] = float(v)
    if kwargs["hidden_size"] % kwargs["num_attention_heads"]:
        raise AtmError(
            f"{where}: hidden_size={kwargs['hidden_size']} is not divisible by "
            f"num_attention_heads={kwargs['num_attention_heads']}"
        )
    return kwargs


# ------------------------------------------------------------------------------------- construction


def required_positions(max_seq_len: int, pad_token_id: int = 1) -> int:
    """Position embeddings RoBERTa needs for sequences of ``max_seq_len`` tokens (specials included).

    RoBERTa numbers positions from ``pad_token_id + 1`` (fairseq convention), so with ``<pad>`` = 1 a
    sequence of T tokens uses position ids 2..T+1 and needs ``max_position_embeddings >= T + 2``.
    """
    return int(max_seq_len) + int(pad_token_id) + 1


def check_max_seq_len(config: Any, max_seq_len: int) -> None:
    """Raise :class:`AtmError` if sequences of ``max_seq_len`` tokens do not fit ``config``'s positions."""
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise AtmError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    cfg = getattr(config, "config", config)
    pad = getattr(cfg, "pad_token_id", 1)
    pad = 1 if pad is None else pad
    need = required_positions(max_seq_len, pad)
    if cfg.max_position_embeddings < need:
        raise AtmError(
            f"max_seq_len={max_seq_len} does not fit the model: RoBERTa needs max_position_embeddings >= "
            f"max_seq_len + {pad + 1} = {need}, the model has {cfg.max_position_embeddings} "
            f"(longest possible max_seq_len: {cfg.max_position_embeddings - pad - 1})"
        )


def make_config(
    model_cfg: Mapping,
    *,
    vocab_size: int,
    pad_token_id: int = 1,
    bos_token_id: int = 0,
    eos_token_id: int = 2,
    max_seq_len: int | None = None,
    attn_implementation: str | None = None,
):
    """``RobertaPreLayerNormConfig`` from a preset mapping plus the tokenizer-derived values.

    ``type_vocab_size`` is 1 (RoBERTa has no segment embeddings; pairs are ``<s> A </s></s> B </s>``).

    Raises:
        AtmError: unknown / tokenizer-owned / missing preset key, bad value, hidden size not divisible
            by the number of heads, or ``max_seq_len`` that would not fit the position embeddings.
    """
    from transformers import RobertaPreLayerNormConfig

    where = f"model preset {model_cfg.get('name', '?')!r}" if isinstance(model_cfg, Mapping) else "model preset"
    kwargs = _validate_preset(model_cfg, where)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise AtmError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = RobertaPreLayerNormConfig(
        **kwargs,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        type_vocab_size=1,
        **extra,
    )
    if max_seq_len is not None:
        try:
            check_max_seq_len(config, max_seq_len)
        except AtmError as err:
            raise AtmError(f"{where}: {err}") from None
    return config


def build_mlm(
    model_cfg: Mapping,
    tokenizer,
    *,
    max_seq_len: int | None = None,
    seed: int | None = None,
    attn_implementation: str | None = None,
):
    """A freshly initialised ``RobertaPreLayerNormForMaskedLM`` with the preset's shape.

    Args:
        model_cfg: a model preset (``cfg.model`` under Hydra, or :func:`load_preset`), see
            :data:`PRESET_KEYS`.
        tokenizer: supplies ``vocab_size = len(tokenizer)`` and the pad/bos/eos ids.
        max_seq_len: longest input (in tokens, ``<s>``/``</s>`` included) the caller will feed;
            checked against ``max_position_embeddings`` (needs ``max_seq_len + 2`` with pad id 1).
        seed: if given, initialise the weights from ``torch.manual_seed(seed)`` without touching the
            global RNG state; otherwise the global torch RNG is used.
        attn_implementation: ``"sdpa"`` (transformers' default), ``"eager"`` (needed to return
            attention probabilities for attention distillation), ...

    Returns:
        The model in training mode, float32; ``logits`` have shape ``[B, T, vocab_size]``.
        The output embedding is tied to the input embedding (RoBERTa).

    Raises:
        AtmError: see :func:`make_config`.
    """
    import torch
    from transformers import RobertaPreLayerNormForMaskedLM

    config = make_config(
        model_cfg,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_seq_len=max_seq_len,
        attn_implementation=attn_implementation,
    )
    if seed is None:
        return RobertaPreLayerNormForMaskedLM(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RobertaPreLayerNormForMaskedLM(config)


# ---------------------------------------------------------------------------------- parameter counts


def _analytic_counts(V: int, H: int, L: int, F: int, P: int, T: int = 1) -> tuple[int, int]:
    """(embedding, non-embedding) parameter counts of ``RobertaPreLayerNormForMaskedLM``.

    Embedding: word (V*H), position (P*H) and token-type (T*H) tables plus the vocabulary-sized
    output bias (V; the output projection weight is tied to the word embedding).
    Non-embedding: embedding LayerNorm (2H); per layer 4H^2 + 2HF + 9H + F (Q, K, V, output
    projections with biases, two LayerNorms, FFN H->F->H with biases); the final LayerNorm (2H);
    the LM head transform (H^2 + H) and its LayerNorm (2H).
    """
    embedding = V * H + P * H + T * H + V
    per_layer = 4 * H * H + 2 * H * F + 9 * H + F
    non_embedding = 2 * H + L * per_layer + 2 * H + H * H + H + 2 * H
    return embedding, non_embedding


def count_parameters(model_or_config: Any, *, vocab_size: int | None = None, non_embedding: bool = False) -> int:
    """Number of parameters of a model, or of ``RobertaPreLayerNormForMaskedLM`` for a config/preset.

    Args:
        model_or_config: an ``nn.Module`` (counts its unique parameters: tied weights once), a
            ``RobertaPreLayerNormConfig``, or a preset mapping (then ``vocab_size`` is required).
            Configs and presets are counted analytically, without building the model, so this works
            for the 9B preset too; for an MLM model both ways agree exactly.
        vocab_size: vocabulary size for a preset mapping, or an override for a config.
        non_embedding: count only non-embedding parameters, the convention of the AlexaTM paper
            ("non-embedding parameter counts ranging from 700M to 9.3B") and of Kaplan et al. (2020):
            excludes the word, position and token-type embedding tables and the vocabulary-sized
            output bias (for a module: parameters named ``*embeddings.{word,position,token_type}_
            embeddings.weight`` and ``lm_head.bias``).

    Raises:
        AtmError: a preset mapping without ``vocab_size``, or a bad preset.
    """
    import torch

    if isinstance(model_or_config, torch.nn.Module):
        total = 0
        for name, p in model_or_config.named_parameters():
            if non_embedding and name.endswith(_EMBEDDING_PARAMS):
                continue
            total += p.numel()
        return total
    if isinstance(model_or_config, Mapping):
        kwargs = _validate_preset(model_or_config, f"model preset {model_or_config.get('name', '?')!r}")
        if vocab_size is None:
            raise AtmError("count_parameters: a model preset needs vocab_size=")
        H, L, F = kwargs["hidden_size"], kwargs["num_hidden_layers"], kwargs["intermediate_size"]
        P, T, V = kwargs["max_position_embeddings"], 1, vocab_size
    else:
        cfg = model_or_config
        H, L, F = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
        P, T = cfg.max_position_embeddings, cfg.type_vocab_size
        V = vocab_size if vocab_size is not None else cfg.vocab_size
    emb, non_emb = _analytic_counts(V, H, L, F, P, T)
    return non_emb if non_embedding else emb + non_emb


# --------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` and ``tokenizer`` with ``save_pretrained`` into ``out_dir``, atomically.

    Works for any transformers model (MLM, joint intent/slot, sequence classifier).  The weights are
    ``model.safetensors`` (transformers v5 always writes safetensors); the tokenizer's ``spm.model``
    and training arguments are copied along when the tokenizer was loaded from a directory that has
    them.  The saved tokenizer's ``model_max_length`` is lowered to what the model's position
    embeddings allow (``max_position_embeddings - pad_token_id - 1``), so that truncation by any
    Hugging Face tool fits the model.  Everything is written into a temporary directory next to
    ``out_dir`` and renamed, so an existing ``out_dir`` is replaced as a whole (its other files are
    lost) or not at all.

    Returns:
        ``Path(out_dir)``.

    Raises:
        AtmError: the tokenizer does not match the model (vocabulary size or pad id), or ``out_dir``
            is an existing file.
    """
    check_compatible(tokenizer, model.config)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _clamp_model_max_length(tmp, model.config)
        src = Path(getattr(tokenizer, "name_or_path", "") or "")
        if str(src) and src.is_dir():
            for name in (SPM_MODEL_FILE, TRAINING_ARGS_FILE):
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
    return out


def _clamp_model_max_length(directory: Path, config: Any) -> None:
    """Lower ``model_max_length`` in a saved ``tokenizer_config.json`` to the model's position limit."""
    max_pos = getattr(config, "max_position_embeddings", None)
    pad = getattr(config, "pad_token_id", None)
    path = directory / "tokenizer_config.json"
    if max_pos is None or not path.is_file():
        return
    limit = max_pos - (1 if pad is None else pad) - 1
    data = json.loads(path.read_text())
    if not isinstance(data.get("model_max_length"), int) or data["model_max_length"] > limit:
        data["model_max_length"] = limit
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise AtmError(f"{path}: checkpoint directory not found")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise AtmError(f"{path}: no config.json (not a saved model)")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise AtmError(f"{cfg}: not a JSON object")
    return data


def _check_kind(path: Path, model_type: str, architecture: str, what: str) -> None:
    """Raise unless ``path`` holds a ``model_type`` checkpoint saved from ``architecture``.

    Checkpoints without ``architectures`` in their config (saved by hand from a config) pass; a
    checkpoint of another head would silently load with a randomly initialised head otherwise.
    """
    data = _read_config(path)
    found = data.get("model_type") or "untyped"
    archs = data.get("architectures") or []
    if found != model_type or (archs and architecture not in archs):
        kind = f"{found} ({', '.join(archs)})" if archs else found
        raise AtmError(f"{path}: a {kind} checkpoint, not a {what}")


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def load_mlm(path: str | os.PathLike, *, attn_implementation: str | None = None):
    """Load a ``RobertaPreLayerNormForMaskedLM`` saved by :func:`save_checkpoint` (safetensors).

    Only local files are read.  When the directory also holds a tokenizer, it is checked against the
    model.  The model is returned in eval mode (transformers' ``from_pretrained`` default).

    Raises:
        AtmError: missing directory or ``config.json``, a checkpoint of another model type or head
            (e.g. a fine-tuned classifier, whose LM head would be random), or a tokenizer whose size
            (or pad id) does not match the model's vocabulary.
    """
    from transformers import RobertaPreLayerNormForMaskedLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return load_pretrained(path, RobertaPreLayerNormForMaskedLM, "roberta-prelayernorm", "pre-LN RoBERTa MLM",
                           **extra)


def load_pretrained(path: str | os.PathLike, model_cls, model_type: str, what: str, **kwargs):
    """``model_cls.from_pretrained(path)`` from local files, after checking ``config.json`` names
    ``model_type``/``model_cls`` and before checking the directory's tokenizer (if any) against the model.

    Raises:
        AtmError: naming ``path``: missing files, another kind of checkpoint (``what`` was expected),
            unreadable weights, or a tokenizer that does not match the model's vocabulary.
    """
    p = Path(path)
    _check_kind(p, model_type, model_cls.__name__, what)
    try:
        model = model_cls.from_pretrained(str(p), local_files_only=True, **kwargs)
    except OSError as err:
        raise AtmError(f"{p}: cannot load model: {str(err).strip().splitlines()[0]}") from None
    if _has_tokenizer(p):
        try:
            check_compatible(load_tokenizer(p), model.config)
        except AtmError as err:
            raise AtmError(f"{p}: {err}") from None
    return model


def load_checkpoint(path: str | os.PathLike, *, attn_implementation: str | None = None):
    """Load ``(model, tokenizer)`` from an MLM checkpoint directory written by :func:`save_checkpoint`: the one
    loader of atm encoder checkpoints (pretraining's ``init``, distillation teachers, fine-tuning and task
    students' encoders, evaluation).

    The two are checked against each other: the tokenizer's size is the model's vocabulary (:func:`load_mlm`),
    its special tokens have atm's fixed ids, and its ``<s>``/``<pad>``/``</s>`` ids are those in the model's
    config.

    Raises:
        AtmError: naming ``path``: no tokenizer (:func:`atm.models.tokenizer.load_tokenizer`), not an MLM
            checkpoint (:func:`load_mlm`), or a tokenizer of another model.
    """
    p = Path(path)
    tokenizer = load_tokenizer(p)
    model = load_mlm(p, attn_implementation=attn_implementation)
    _check_special_ids(tokenizer, f"{p}: tokenizer/model mismatch")
    for attr in ("bos_token_id", "pad_token_id", "eos_token_id"):
        want = getattr(model.config, attr, None)
        if want is not None and getattr(tokenizer, attr) != want:
            raise AtmError(f"{p}: tokenizer/model mismatch: tokenizer {attr}={getattr(tokenizer, attr)} but "
                           f"the model's config has {attr}={want}")
    return model, tokenizer


def mlm_forward(model, input_ids, attention_mask, positions=None, *, output_hidden_states: bool = False,
                output_attentions: bool = False) -> dict[str, Any]:
    """Run a masked-LM and return TextBrewer's adaptor dict, with the LM head applied only at ``positions``.

    The vocabulary projection dominates the cost of a small encoder (V >> D), and MLM losses, soft
    cross-entropy on masked tokens, perplexity and mask-filling only need it at the selected tokens.

    Args:
        model: a ``RobertaPreLayerNormForMaskedLM`` (any ``*ForMaskedLM`` with ``base_model``/``lm_head``).
        input_ids, attention_mask: ``[B, T]``.
        positions: bool ``[B, T]``; None selects every position.

    Returns:
        ``{"logits": [N, V] at the N selected positions (row-major order), "hidden_states": tuple of
        [B, T, D] (embeddings first; None unless requested), "attentions": tuple of [B, H, T, T] or None,
        "attention_mask": [B, T], "positions": [B, T]}``.
    """
    enc = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions)
    if positions is None:
        positions = attention_mask.new_ones(attention_mask.shape, dtype=torch.bool)
    logits = model.lm_head(enc.last_hidden_state[positions])
    return {"logits": logits, "hidden_states": enc.hidden_states, "attentions": enc.attentions,
            "attention_mask": attention_mask, "positions": positions}


@contextmanager
def training_dropout(model: torch.nn.Module, p: float | None) -> Iterator[torch.nn.Module]:
    """Inside the block every ``nn.Dropout`` of ``model`` (hidden, attention-probability and classifier
    dropout of transformers encoders) drops with probability ``p``; on exit each gets its own back.

    ``model.config`` is untouched, so a checkpoint saved inside the block keeps the configured dropout
    (fine-tuning from it uses that). Cramming (Geiping & Goldstein 2022, sec. 4.2) pretrains without dropout
    in short budgets: the model never sees a token often enough to overfit. ``p=None`` changes nothing.
    """
    if p is None:
        yield model
        return
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in layers]
    for m in layers:
        m.p = float(p)
    try:
        yield model
    finally:
        for m, old in zip(layers, saved):
            m.p = old
