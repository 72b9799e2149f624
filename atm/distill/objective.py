"""The distillation objective: hard MLM loss + logit loss + intermediate (hidden-state) loss.

``L = w_hard * mlm_ce(z_s, y) + w_logit * logit_loss(z_s, z_t; T) + w_hidden * mean_{(i,j) in map} hidden_loss(W_i h_s^i, h_t^j)``

Student and teacher outputs come from :func:`atm.models.encoder.mlm_forward` (TextBrewer's adaptor
contract: ``logits``, ``hidden_states`` with the embeddings first, ``attentions``, ``attention_mask``).
The projections ``W_i`` (student width -> teacher width, only when they differ) are created from the two
model configs, trained in the student's optimiser and never saved into the student checkpoint.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from omegaconf import DictConfig
from torch import nn

from atm.distill.losses import get_loss
from atm.distill.mapping import get_mapping
from atm.errors import AtmError


class DistillationObjective(nn.Module):
    """Builds the losses of ``distill`` config and the projections they need.

    Args:
        cfg: the ``distill`` config (hard_weight; logit.{loss, weight, temperature, positions};
            hidden.{loss, weight, layer_mapping}).
        teacher_config, student_config: transformers model configs.

    Raises:
        AtmError: unknown loss or mapping name, different vocabularies for a vocabulary-level logit loss,
            more student than teacher layers.
    """

    def __init__(self, cfg: DictConfig, teacher_config: Any, student_config: Any):
        super().__init__()
        self.cfg = cfg
        self.hard = get_loss("mlm_ce", "hard")
        self.logit = get_loss(cfg.logit.loss, "logit", "distill.logit.loss") if cfg.logit.loss else None
        self.hidden = get_loss(cfg.hidden.loss, "hidden", "distill.hidden.loss") if cfg.hidden.loss else None
        if cfg.logit.positions not in ("masked", "all"):
            raise AtmError(f"distill.logit.positions={cfg.logit.positions!r} must be 'masked' or 'all'")
        if self.logit and teacher_config.vocab_size != student_config.vocab_size:
            raise AtmError(f"distill.logit.loss={cfg.logit.loss}: teacher and student vocabularies differ "
                           f"({teacher_config.vocab_size} vs {student_config.vocab_size})")
        self.pairs = (get_mapping(cfg.hidden.layer_mapping, teacher_config.num_hidden_layers,
                                  student_config.num_hidden_layers) if self.hidden else [])
        d_s, d_t = student_config.hidden_size, teacher_config.hidden_size
        self.projections = nn.ModuleList(
            [nn.Linear(d_s, d_t) for _ in self.pairs] if d_s != d_t else [])

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden is not None

    def positions(self, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Where the LM head is needed, bool ``[B, T]``: the masked tokens (``distill.logit.positions=masked``)
        or every real token (``all``)."""
        return labels != -100 if self.cfg.logit.positions == "masked" else attention_mask.bool()

    def forward(self, out_s: Mapping[str, Any], out_t: Mapping[str, Any],
                labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts.

        Args:
            out_s, out_t: :func:`atm.models.encoder.mlm_forward` dicts of student and teacher, both with
                ``logits[N, V]`` at the same :meth:`positions`.
            labels: ``[N]`` MLM labels at those positions (-100 where nothing was masked).
        """
        cfg = self.cfg
        parts: dict[str, torch.Tensor] = {"mlm": self.hard.fn(out_s["logits"], labels)}
        total = cfg.hard_weight * parts["mlm"]
        if self.logit:
            parts[self.logit.name] = self.logit.fn(out_s["logits"], out_t["logits"],
                                                   temperature=cfg.logit.temperature)
            total = total + cfg.logit.weight * parts[self.logit.name]
        if self.hidden:
            losses = []
            for k, (i, j) in enumerate(self.pairs):
                h_s = out_s["hidden_states"][i]
                if len(self.projections):
                    h_s = self.projections[k](h_s)
                losses.append(self.hidden.fn(h_s, out_t["hidden_states"][j], out_s["attention_mask"]))
            parts[self.hidden.name] = torch.stack(losses).mean()
            total = total + cfg.hidden.weight * parts[self.hidden.name]
        return total, {name: float(value.detach()) for name, value in parts.items()}
