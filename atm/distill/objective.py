"""The distillation objective: hard MLM loss + logit loss + one intermediate objective.

``L = w_hard * mlm_ce(z_s, y) + w_logit * c_T * logit_loss(z_s, z_t; T) + w_int * sum_{(i,j)} pi_ij * l(S_i, T_j)``

with ``c_T = T^2`` when ``distill.logit.t_squared`` (Hinton et al. 2015) else 1, ``T`` constant or linearly
scheduled, ``(i, j)`` the pairs of the layer mapping, ``pi_ij = 1/|pairs|`` (or the transport plan of a
soft mapping, BERT-EMD), and ``S_i, T_j`` the student/teacher tensors the intermediate loss's kind reads:
hidden states ``[B,T,D]`` (``hidden``; embeddings are layer 0), first-token states ``[B,D]``
(``pooled``) or pre-softmax attention scores ``[B,H,T,T]`` (``attention``).

Model outputs come from :func:`atm.models.encoder.mlm_forward` (TextBrewer's adaptor contract:
``logits``, ``hidden_states`` with the embeddings first, ``attentions``, ``attention_mask``). Projections
(student width -> teacher width, where a plain loss needs equal widths) and the critics of trainable
losses are created here from the two model configs, trained in the student's optimiser and never saved
into the student checkpoint.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from atm.distill.losses import LOSSES, build_loss, get_loss, merge_heads
from atm.distill.mapping import MAPPINGS, SOFT_MAPPINGS, get_mapping, transport_plan
from atm.errors import AtmError

INTERMEDIATE_KINDS = ("hidden", "pooled", "attention")


def check_names(cfg: DictConfig) -> None:
    """Validate the names in a ``distill`` config before anything is trained.

    Raises:
        AtmError: an unknown logit loss, intermediate loss, layer mapping or head rule, naming the key.
    """
    if cfg.logit.loss:
        get_loss(cfg.logit.loss, "logit", "distill.logit.loss")
    inter = cfg.intermediate
    if inter.loss:
        spec = LOSSES.get(inter.loss)
        if spec is None or spec.kind not in INTERMEDIATE_KINDS:
            known = ", ".join(n for n, s in LOSSES.items() if s.kind in INTERMEDIATE_KINDS)
            raise AtmError(f"distill.intermediate.loss={inter.loss!r} is not a known intermediate loss "
                           f"(known: {known})")
        if inter.layer_mapping not in MAPPINGS:
            get_mapping(inter.layer_mapping, 1, 1)  # raises, naming the key
    if inter.heads not in ("match", "mean"):
        raise AtmError(f"distill.intermediate.heads={inter.heads!r} must be 'match' or 'mean'")
    if cfg.logit.positions not in ("masked", "all"):
        raise AtmError(f"distill.logit.positions={cfg.logit.positions!r} must be 'masked' or 'all'")


class DistillationObjective(nn.Module):
    """Builds the losses of a ``distill`` config and the projections and critics they need.

    Args:
        cfg: the ``distill`` config (see ``conf/distill/default.yaml``).
        teacher_config, student_config: transformers model configs.
        max_steps: training length, for the temperature schedule.

    Raises:
        AtmError: unknown names; teacher and student vocabularies differ for a vocabulary-level logit loss;
            more student than teacher layers for a mapping that needs fewer; attention matching with
            different head counts and ``heads: match`` (or counts that do not divide).
    """

    def __init__(self, cfg: DictConfig, teacher_config: Any, student_config: Any, max_steps: int = 1):
        super().__init__()
        check_names(cfg)
        self.cfg = cfg
        self.max_steps = max(1, int(max_steps))
        self.hard = get_loss("mlm_ce", "hard")
        self.logit = get_loss(cfg.logit.loss, "logit", "distill.logit.loss") if cfg.logit.loss else None
        if self.logit and teacher_config.vocab_size != student_config.vocab_size:
            raise AtmError(f"distill.logit.loss={cfg.logit.loss}: teacher and student vocabularies differ "
                           f"({teacher_config.vocab_size} vs {student_config.vocab_size})")
        inter = cfg.intermediate
        self.inter = LOSSES[inter.loss] if inter.loss else None
        self.pairs: list[tuple[int, int]] = []
        self.soft = False
        self.projections = nn.ModuleList()
        self.inter_losses = nn.ModuleList()
        if self.inter is None:
            return
        kind = self.inter.kind
        self.soft = inter.layer_mapping in SOFT_MAPPINGS
        self.pairs = get_mapping(inter.layer_mapping, teacher_config.num_hidden_layers,
                                 student_config.num_hidden_layers)
        if kind == "attention":
            self.pairs = [(i, j) for i, j in self.pairs if i > 0 and j > 0]  # attention maps exist per layer
            h_s, h_t = student_config.num_attention_heads, teacher_config.num_attention_heads
            if h_s != h_t and (inter.heads == "match" or h_t % h_s):
                raise AtmError(f"distill.intermediate.loss={inter.loss}: the teacher has {h_t} attention heads and "
                               f"the student {h_s}; set distill.intermediate.heads=mean (needs {h_s} to divide {h_t})")
        if not self.pairs:
            raise AtmError(f"distill.intermediate.layer_mapping={inter.layer_mapping} maps no layer for "
                           f"{student_config.num_hidden_layers} student and {teacher_config.num_hidden_layers} "
                           f"teacher layers")
        d_s, d_t = student_config.hidden_size, teacher_config.hidden_size
        options = OmegaConf.to_container(inter.options, resolve=True) if inter.options else {}
        if kind in ("hidden", "pooled") and not self.inter.trainable and d_s != d_t:
            # one projection per student layer (TinyBERT's W_h), shared by the pairs of that layer
            self.student_layers = sorted({i for i, _ in self.pairs})
            self.projections = nn.ModuleList(nn.Linear(d_s, d_t) for _ in self.student_layers)
        n_modules = len(self.pairs) if self.inter.trainable else 1  # one critic per mapped pair
        self.inter_losses = nn.ModuleList(build_loss(self.inter, d_s, d_t, **options) for _ in range(n_modules))

    @property
    def needs_hidden_states(self) -> bool:
        return self.inter is not None and self.inter.kind in ("hidden", "pooled")

    @property
    def needs_attentions(self) -> bool:
        return self.inter is not None and self.inter.kind == "attention"

    def positions(self, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Where the LM head is needed, bool ``[B, T]``: the masked tokens (``distill.logit.positions=masked``)
        or every real token (``all``)."""
        return labels != -100 if self.cfg.logit.positions == "masked" else attention_mask.bool()

    def temperature(self, step: int) -> float:
        """T at ``step``: constant, or linear from ``temperature`` to ``temperature_end`` over training."""
        start, end = float(self.cfg.logit.temperature), self.cfg.logit.temperature_end
        if end is None:
            return start
        return start + (float(end) - start) * min(1.0, step / self.max_steps)

    def _intermediate_tensors(self, out: Mapping[str, Any], layer: int, student: bool) -> torch.Tensor:
        kind = self.inter.kind
        if kind == "attention":
            return out["attentions"][layer - 1]
        h = out["hidden_states"][layer]
        if student and len(self.projections):
            h = self.projections[self.student_layers.index(layer)](h)
        return h[:, 0] if kind == "pooled" else h

    def forward(self, out_s: Mapping[str, Any], out_t: Mapping[str, Any], labels: torch.Tensor,
                step: int = 0, hard_scale: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts (floats, for logging).

        Args:
            out_s, out_t: :func:`atm.models.encoder.mlm_forward` dicts of student and teacher, both with
                ``logits[N, V]`` at the same :meth:`positions`.
            labels: ``[N]`` MLM labels at those positions (-100 where nothing was masked).
            step: the training step (temperature schedule).
            hard_scale: factor on the hard loss (mixup: lambda, the weight of the example the labels are of).

        A batch without any masked token (``N = 0`` with ``positions: masked``, or every label -100)
        contributes 0 to the hard and logit terms (their means over no position are 0, not NaN), so it
        neither stops training nor moves the student through those terms.
        """
        cfg = self.cfg
        parts: dict[str, torch.Tensor] = {"mlm": hard_scale * self.hard.fn(out_s["logits"], labels)}
        total = cfg.hard_weight * parts["mlm"]
        if self.logit:
            t = self.temperature(step)
            value = self.logit.fn(out_s["logits"], out_t["logits"], temperature=t)
            parts[self.logit.name] = value
            total = total + cfg.logit.weight * (t * t if cfg.logit.t_squared else 1.0) * value
        if self.inter:
            mask = out_s["attention_mask"]
            losses = []
            for k, (i, j) in enumerate(self.pairs):
                s = self._intermediate_tensors(out_s, i, student=True)
                t_ = self._intermediate_tensors(out_t, j, student=False)
                if self.inter.kind == "attention" and t_.shape[1] != s.shape[1]:
                    t_ = merge_heads(t_, s.shape[1])
                module = self.inter_losses[k if self.inter.trainable else 0]
                losses.append(module(s, t_, mask))
            costs = torch.stack(losses)
            if self.soft:
                m = len({i for i, _ in self.pairs})
                plan = transport_plan(costs.detach().view(m, -1)).view(-1).to(costs.device)
                value = (plan * costs).sum()
            else:
                value = costs.mean()
            parts[self.inter.name] = value
            total = total + cfg.intermediate.weight * value
        return total, {name: float(v.detach()) for name, v in parts.items()}
