"""Pre-softmax attention scores from transformers encoders, for attention distillation.

transformers returns post-softmax attention probabilities as ``attentions``. TinyBERT's attention loss
(Jiao et al. 2020, eq. 7) and the losses of :mod:`atm.distill.losses` (kind ``attention``) want the
pre-softmax SCORES ``q k^T / sqrt(d_head) + additive_mask``. This module registers, with transformers v5's
``AttentionInterface``, an attention function named :data:`SCORES_IMPLEMENTATION` (``"atm_scores"``) that
computes exactly what the eager implementation computes (same output, same dropout on the probabilities)
but returns the scores as its attention weights; its mask function is transformers' ``eager_mask`` (0 for
real keys, ``finfo(dtype).min`` for padded keys, or None when nothing is padded).

Usage (any model whose attention goes through ``ALL_ATTENTION_FUNCTIONS``, e.g.
``RobertaPreLayerNormForMaskedLM``)::

    set_attention_scores(model, True)      # or: with attention_scores_mode(model): ...
    out = mlm_forward(model, ids, mask, output_attentions=True)
    out["attentions"]                      # tuple of [B, H, T, T] pre-softmax scores, one per layer

``softmax(scores, -1)`` equals the eager attention probabilities. Padded KEYS carry the large negative
mask value; padded QUERY rows hold ordinary scores over the real keys (transformers masks keys only) --
the attention losses mask both from ``attention_mask``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

SCORES_IMPLEMENTATION = "atm_scores"
#: Attribute on the model remembering the implementation to restore.
_PREVIOUS = "_atm_previous_attn_implementation"


def scores_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that returns the pre-softmax scores as its weights.

    Args:
        query, key, value: ``[B, H, T_q, d]``, ``[B, H, T_k, d]``, ``[B, H, T_k, d]``.
        attention_mask: additive float mask broadcastable to ``[B, H, T_q, T_k]`` (or a boolean one, True =
            attend, converted to 0 / ``finfo.min``), or None.
        scaling: defaults to ``d ** -0.5``; dropout: on the probabilities, in training mode only.

    Returns:
        ``(output[B, T_q, H, d], scores[B, H, T_q, T_k])`` with ``scores = q k^T * scaling + mask`` and
        ``output = dropout(softmax(scores)) v`` -- the eager implementation's output.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, torch.zeros((), dtype=scores.dtype, device=scores.device),
                                         torch.finfo(scores.dtype).min)
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, scores


def register() -> None:
    """Register :data:`SCORES_IMPLEMENTATION` with transformers' attention and mask interfaces (idempotent;
    done on import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SCORES_IMPLEMENTATION, scores_attention_forward)
    AttentionMaskInterface.register(SCORES_IMPLEMENTATION, eager_mask)


register()


def uses_attention_scores(model: Any) -> bool:
    """Whether ``model`` currently returns pre-softmax scores as ``attentions``."""
    return model.config._attn_implementation == SCORES_IMPLEMENTATION


def set_attention_scores(model: Any, enabled: bool) -> Any:
    """Switch a loaded transformers model to returning pre-softmax scores (``enabled``) or back.

    Enabling remembers the current implementation (``"sdpa"``, ``"eager"``, ...) and calls
    ``model.set_attn_implementation("atm_scores")``; disabling restores it (``"sdpa"`` if unknown). The
    weights are untouched; outputs are the same up to float rounding of the attention kernel. Returns
    ``model``.
    """
    current = model.config._attn_implementation
    if enabled:
        if current != SCORES_IMPLEMENTATION:
            setattr(model, _PREVIOUS, current)
            model.set_attn_implementation(SCORES_IMPLEMENTATION)
    elif current == SCORES_IMPLEMENTATION:
        model.set_attn_implementation(getattr(model, _PREVIOUS, None) or "sdpa")
    return model


@contextmanager
def attention_scores_mode(model: Any) -> Iterator[Any]:
    """Context manager: ``model`` returns pre-softmax scores as ``attentions`` inside the block; the previous
    attention implementation is restored on exit."""
    was = uses_attention_scores(model)
    set_attention_scores(model, True)
    try:
        yield model
    finally:
        if not was:
            set_attention_scores(model, False)
