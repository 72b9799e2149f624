"""The batch transforms of distillation data augmentation: one class per ``augment.name``.

:mod:`atm.distill.augment` checks the ``augment`` config and builds these
(:func:`atm.distill.augment.build_augmentation`; its module doc describes every method). This module holds
what they do to a batch: :class:`Augmentation` (the base: ``aug(batch, generator) -> batch``), the token-level
(:class:`TokenAugmentation`) :class:`RandomReplace`, :class:`MaskReplace` and :class:`ContextualReplace`,
then :class:`Mixup` and :class:`Repeated`, and the helpers that find the tokens a token-level method may
change (:func:`special_token_ids`, :func:`eligible_positions`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from atm.distill.augment import MIXUP_INDEX, MIXUP_LAMBDA, REPEAT_INDEX, SAMPLING, step_generator
from atm.errors import AtmError

__all__ = [
    "Augmentation",
    "ContextualReplace",
    "MaskReplace",
    "Mixup",
    "RandomReplace",
    "Repeated",
    "TokenAugmentation",
    "eligible_positions",
    "special_token_ids",
]


# ------------------------------------------------------------------------------------------ helpers


def special_token_ids(tokenizer) -> list[int]:
    """Sorted ids of the tokenizer's special tokens (``<s>``, ``</s>``, ``<pad>``, ``<unk>``, ``<mask>``, ...)."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id",
                 "cls_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def eligible_positions(batch: Mapping[str, torch.Tensor], special_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: positions a token-level augmentation may change -- real tokens (``attention_mask``)
    that are not special (``special_ids``, long ``[S]``) and not MLM targets (``labels != -100``, when the
    batch has ``labels``)."""
    ids = batch["input_ids"]
    ok = ~torch.isin(ids, special_ids.to(ids.device))
    if "attention_mask" in batch:
        ok &= batch["attention_mask"].bool()
    if batch.get("labels") is not None:
        ok &= batch["labels"] == -100
    return ok


def _uniform(shape, generator: torch.Generator, device) -> torch.Tensor:
    """U[0, 1) draws from ``generator`` (on its own device), moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _rate(changed: torch.Tensor, eligible: torch.Tensor) -> float:
    n = int(eligible.sum())
    return float((changed & eligible).sum()) / n if n else 0.0


# ------------------------------------------------------------------------------------- augmentations


class Augmentation:
    """Base class: ``aug(batch, generator) -> batch``.

    ``batch`` is a dict of ``input_ids[B,T]``, ``attention_mask[B,T]`` and (optionally) ``labels[B,T]``
    (other tensor keys with leading dimension B are carried along).  The input is never modified; the result
    is a new dict on the same device (possibly larger: :class:`Repeated`).  All randomness comes from
    ``generator``.  After each call ``last_rate`` is the fraction of eligible tokens changed and
    ``last_metrics`` the dict to log (``augment/rate``, and ``augment/mixup_lambda`` for mixup).
    """

    name: str = "augmentation"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.last_rate: float = 0.0
        self.last_metrics: dict[str, float] = {"augment/rate": 0.0}

    def __call__(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def at_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """``self(batch, step_generator(self.seed, step))``: the augmented batch of training step ``step``."""
        return self(batch, step_generator(self.seed, step))

    def _record(self, rate: float, **extra: float) -> None:
        self.last_rate = float(rate)
        self.last_metrics = {"augment/rate": self.last_rate, **{f"augment/{k}": float(v) for k, v in extra.items()}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


class TokenAugmentation(Augmentation):
    """A token-level augmentation: every eligible token (see :func:`eligible_positions`) is selected with
    probability ``probability`` and replaced by :meth:`replace`; ``labels`` and ``attention_mask`` are kept.

    Args:
        tokenizer: gives the special ids (never touched) and the vocabulary size ``len(tokenizer)``.
        probability: per-token selection rate p in [0, 1].
        seed: ``augment.seed`` (used by :meth:`at_step`).
    """

    def __init__(self, tokenizer, probability: float, seed: int = 0):
        super().__init__(seed)
        if not 0.0 <= float(probability) <= 1.0:
            raise AtmError(f"augment.probability={probability!r} must be a probability in [0, 1]")
        self.probability = float(probability)
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(special_token_ids(tokenizer), dtype=torch.long)
        allowed = torch.ones(self.vocab_size, dtype=torch.bool)
        allowed[self.special_ids[self.special_ids < self.vocab_size]] = False
        #: Non-special vocabulary ids, long ``[V']``: what a token may be replaced with.
        self.candidate_ids = allowed.nonzero().squeeze(1)
        if len(self.candidate_ids) == 0:
            raise AtmError(f"augment.name={self.name!r}: the tokenizer has no non-special tokens")

    def __call__(self, batch, generator):
        ids = batch["input_ids"]
        eligible = eligible_positions(batch, self.special_ids)
        selected = eligible & (_uniform(ids.shape, generator, ids.device) < self.probability)
        new_ids = self.replace(batch, selected, generator) if bool(selected.any()) else ids
        self._record(_rate(new_ids != ids, eligible))
        return {**batch, "input_ids": new_ids}

    def replace(self, batch, selected: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """New ``input_ids[B,T]``: ``batch["input_ids"]`` with the ``selected`` (bool ``[B,T]``) tokens replaced."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(probability={self.probability}, seed={self.seed})"


class RandomReplace(TokenAugmentation):
    """``random_replace``: each eligible token becomes, with probability p, a non-special vocabulary id drawn
    uniformly (the "random" word replacement baseline of Distiller sec. 3.4 / EDA-style noise).  The draw can
    hit the original token (chance 1/V' with V' non-special ids), so the expected rate is p (1 - 1/V')."""

    name = "random_replace"

    def replace(self, batch, selected, generator):
        ids = batch["input_ids"]
        draw = torch.randint(len(self.candidate_ids), ids.shape, generator=generator, device=generator.device)
        random_ids = self.candidate_ids[draw.cpu()].to(ids.device, ids.dtype)
        return torch.where(selected, random_ids, ids)


class MaskReplace(TokenAugmentation):
    """``mask``: each eligible token becomes ``<mask>`` with probability p.  ``labels`` stay as they are (these
    positions are not MLM targets), so the student learns to match the teacher on a corrupted context."""

    name = "mask"

    def __init__(self, tokenizer, probability: float, seed: int = 0):
        super().__init__(tokenizer, probability, seed)
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise AtmError("augment.name='mask' needs a tokenizer with a <mask> token")
        self.mask_id = int(tokenizer.mask_token_id)

    def replace(self, batch, selected, generator):
        return batch["input_ids"].masked_fill(selected, self.mask_id)


class ContextualReplace(TokenAugmentation):
    """``contextual``: contextual augmentation with the teacher's MLM head (Kobayashi 2018; TinyBERT sec. 3.1;
    Distiller sec. 3.4).

    Each eligible token is selected with probability p; all selected tokens of the batch are replaced by
    ``<mask>`` and the teacher is run ONCE (``mlm_forward(teacher, masked_ids, attention_mask, selected)``,
    under ``no_grad`` and in eval mode) giving ``logits[N, V]`` at the N selected positions.  Special ids,
    ids outside the tokenizer and the original token are excluded (the original only while another
    candidate remains), and the new token is drawn from the ``top_k`` remaining ids: uniformly
    (``sampling=uniform``, as TinyBERT's ``random.choice`` over its K candidates) or with the teacher's
    probabilities renormalised over the top k (``sampling=teacher``).  TinyBERT masks one word per teacher
    pass; masking all selected tokens at once costs one pass per batch but sees a more corrupted context
    when p is large.  Ties in the teacher's logits are broken by ``torch.topk``.

    Args:
        teacher: a ``*ForMaskedLM`` with ``base_model``/``lm_head`` whose vocabulary covers the tokenizer.
        top_k: number of candidates k >= 1.
        sampling: ``uniform`` or ``teacher``.
    """

    name = "contextual"

    def __init__(self, tokenizer, teacher, probability: float, seed: int = 0, top_k: int = 5,
                 sampling: str = "uniform"):
        super().__init__(tokenizer, probability, seed)
        if teacher is None:
            raise AtmError("augment.name='contextual' needs the teacher (its MLM head proposes the replacements)")
        if getattr(tokenizer, "mask_token_id", None) is None:
            raise AtmError("augment.name='contextual' needs a tokenizer with a <mask> token")
        if sampling not in SAMPLING:
            raise AtmError(f"augment.sampling={sampling!r} must be one of {', '.join(SAMPLING)}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise AtmError(f"augment.top_k={top_k!r} must be an integer >= 1")
        teacher_vocab = int(teacher.config.vocab_size)
        if teacher_vocab < self.vocab_size:
            raise AtmError(f"augment.name='contextual': the teacher's vocabulary ({teacher_vocab}) is smaller "
                           f"than the tokenizer's ({self.vocab_size})")
        self.teacher = teacher
        self.top_k = top_k
        self.sampling = sampling
        self.mask_id = int(tokenizer.mask_token_id)
        banned = torch.ones(teacher_vocab, dtype=torch.bool)
        banned[self.candidate_ids] = False
        self._banned = banned  # [V_teacher]: specials and ids beyond the tokenizer

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       selected: torch.Tensor) -> torch.Tensor:
        """Teacher MLM logits ``[N, V]`` (float32, on the batch's device) at the N ``selected`` positions of
        ``input_ids`` with those positions replaced by ``<mask>``."""
        from atm.models.encoder import mlm_forward

        teacher = self.teacher
        device = next(teacher.parameters()).device
        was_training = teacher.training
        teacher.eval()
        try:
            masked = input_ids.masked_fill(selected, self.mask_id)
            logits = mlm_forward(teacher, masked.to(device), attention_mask.to(device), selected.to(device))["logits"]
        finally:
            teacher.train(was_training)
        return logits.float().to(input_ids.device)

    def candidates(self, logits: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """The top-k allowed ids ``[N, k']`` (k' = min(k, allowed)) and their logits for ``logits[N, V]`` and
        the ``original[N]`` tokens: special ids, ids beyond the tokenizer and (while another candidate is left)
        the original token are excluded.  Returns ``(values[N, k'], ids[N, k'])``."""
        banned = self._banned.to(logits.device)
        scores = logits.masked_fill(banned, float("-inf"))
        allowed = len(self.candidate_ids)
        if allowed > 1:
            scores = scores.scatter(1, original.unsqueeze(1).to(logits.device), float("-inf"))
            allowed -= 1
        return torch.topk(scores, min(self.top_k, allowed), dim=1)

    def replace(self, batch, selected, generator):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        logits = self.teacher_logits(ids, mask, selected)
        values, top = self.candidates(logits, ids[selected])
        n, k = top.shape
        if self.sampling == "uniform":
            pick = torch.randint(k, (n,), generator=generator, device=generator.device)
        else:
            probs = torch.softmax(values.to(generator.device), dim=1)
            pick = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        new_tokens = top.gather(1, pick.to(top.device).unsqueeze(1)).squeeze(1)
        out = ids.clone()
        out[selected] = new_tokens.to(ids.device, ids.dtype)
        return out

    def __repr__(self) -> str:
        return (f"ContextualReplace(probability={self.probability}, top_k={self.top_k}, "
                f"sampling={self.sampling!r}, seed={self.seed})")


class Mixup(Augmentation):
    """``mixup``: embedding mixup for distillation (Zhang et al. 2018; MixKD, Liang et al. 2021; Distiller
    sec. 3.4).

    ``__call__`` leaves ``input_ids`` and ``labels`` (those of the FIRST example of each pair) as they are and
    adds ``mixup_index`` (long ``[B]``: a random single cycle over the batch, so every example is paired
    with another one when B > 1) and ``mixup_lambda`` (float32 0-d tensor, lambda ~ Beta(alpha, alpha));
    ``attention_mask`` becomes the union ``mask | mask[mixup_index]``.  The models are then run on
    ``inputs_embeds`` = ``lambda * E[input_ids] + (1 - lambda) * E[input_ids[mixup_index]]``, each with its
    OWN word embeddings E (:func:`mixup_embeddings`, :func:`mixup_mlm_forward`).  The soft (logit/hidden)
    losses compare teacher and student on the same mixed input; the hard MLM loss uses ``labels`` (the
    first example's targets) weighted by lambda.  ``last_rate`` is ``1 - lambda``, the partner's weight in
    every mixed embedding.

    Lambda is drawn by numpy's Beta sampler seeded from ``generator`` (torch has no seeded Beta sampler).
    """

    name = "mixup"

    def __init__(self, alpha: float = 0.4, seed: int = 0):
        super().__init__(seed)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise AtmError(f"augment.alpha={alpha!r} must be positive (Beta(alpha, alpha))")
        self.alpha = float(alpha)

    def __call__(self, batch, generator):
        import numpy as np

        ids = batch["input_ids"]
        b = ids.shape[0]
        order = torch.randperm(b, generator=generator, device=generator.device).cpu()
        index = torch.empty(b, dtype=torch.long)
        index[order] = order.roll(-1)  # order[i] -> order[i+1]: one cycle, no fixed point when b > 1
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        lam_t = torch.tensor(np.random.default_rng(seed).beta(self.alpha, self.alpha), dtype=torch.float32)
        lam = float(lam_t)  # the float32 value the models use
        index = index.to(ids.device)
        out = {**batch, MIXUP_INDEX: index, MIXUP_LAMBDA: lam_t.to(ids.device)}
        if "attention_mask" in batch:
            m = batch["attention_mask"]
            out["attention_mask"] = (m.bool() | m.bool()[index]).to(m.dtype)
        self._record(1.0 - lam, mixup_lambda=lam)
        return out

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.alpha}, seed={self.seed})"


class Repeated(Augmentation):
    """``repeated``: repeated augmentation (Hoffer et al. 2020, "Augment your batch"; Distiller sec. 3.4).

    Every tensor of the batch with leading dimension B is repeated ``copies`` times
    (``repeat_interleave``: rows ``i*copies .. i*copies+copies-1`` come from example i), then the token-level
    ``inner`` augmentation is applied to the whole ``[B*copies, T]`` batch, so each copy gets its own draw
    (one teacher pass for ``contextual``).  Adds ``repeat_index`` (long ``[B*copies]``, the source example
    of each row).  ``last_rate`` is the inner augmentation's.
    """

    name = "repeated"

    def __init__(self, inner: TokenAugmentation, copies: int = 2, seed: int = 0):
        super().__init__(seed)
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise AtmError(f"augment.copies={copies!r} must be an integer >= 1")
        self.inner = inner
        self.copies = copies

    def __call__(self, batch, generator):
        b = batch["input_ids"].shape[0]
        rep = {k: v.repeat_interleave(self.copies, dim=0)
               if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b else v
               for k, v in batch.items()}
        out = self.inner(rep, generator)
        out[REPEAT_INDEX] = torch.arange(b, device=batch["input_ids"].device).repeat_interleave(self.copies)
        self._record(self.inner.last_rate)
        return out

    def __repr__(self) -> str:
        return f"Repeated(inner={self.inner!r}, copies={self.copies}, seed={self.seed})"
