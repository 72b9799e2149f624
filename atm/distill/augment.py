"""Data augmentation for distillation: transform an MLM batch before teacher and student see it.

Distillation transfers more when the student sees inputs off the training distribution on which the
teacher's outputs are still informative (TinyBERT, Jiao et al. 2020, sec. 3.1 "Data Augmentation";
Distiller, He et al. 2021, sec. 3.4).  An :class:`Augmentation` maps a batch of
:func:`atm.data.collate.mlm_collator` -- ``input_ids[B,T]``, ``attention_mask[B,T]``, ``labels[B,T]``
(-100 off the masked positions) -- to an augmented batch that BOTH teacher and student are then run on.
Config group ``augment`` (``conf/augment/<name>.yaml``), built by :func:`build_augmentation`:

==================  ========================================================================================
``augment.name``    what it does (options besides ``probability`` p and ``seed``)
==================  ========================================================================================
``none``            nothing (:func:`build_augmentation` returns None)
``random_replace``  each eligible token becomes, with probability p, a uniformly random non-special id
``mask``            each eligible token becomes ``<mask>`` with probability p (labels unchanged)
``contextual``      each eligible token is chosen with probability p; the chosen ones are masked and
                    replaced by a draw from the TEACHER's top-k MLM predictions there (TinyBERT sec. 3.1;
                    ``top_k`` (5), ``sampling``: ``uniform`` (TinyBERT) or ``teacher`` (top-k
                    renormalised teacher probabilities))
``mixup``           embedding mixup (Zhang et al. 2018; MixKD, Liang et al. 2021; Distiller sec. 3.4):
                    pairs each example with another and draws lambda ~ Beta(alpha, alpha)
                    (``alpha`` (0.4)); p is not used.  See :func:`mixup_embeddings`.
``repeated``        repeated augmentation (Hoffer et al. 2020): every example ``copies`` (2) times, each
                    copy with its own draw of the token-level ``inner`` augmentation (``random_replace``,
                    ``mask`` or ``contextual``, with that method's options)
==================  ========================================================================================

Eligible tokens (token-level methods): real (``attention_mask`` = 1), not a special token (``<s>``,
``</s>``, ``<pad>``, ``<unk>``, ``<mask>``: ``tokenizer.all_special_ids``) and not an MLM target
(``labels == -100``), so the hard MLM loss on the targets stays valid and labels are never changed.

Determinism: every random draw comes from the ``torch.Generator`` passed to ``__call__`` (CPU generators
give the same result whatever device the batch is on); :func:`step_generator` derives it from
``augment.seed`` and the training step, so a fixed teacher + data order + augmentation config always yields
the same augmented batches.  ``augment.seed`` is deliberately NOT the run seed: students trained with
different seeds share augmented batches, hence teacher outputs.  :func:`augmentation_key` is the stable
hash of the (canonicalised) augment config for a teacher-output cache.

Every call stores the measured replacement rate (fraction of eligible tokens changed) in
``aug.last_rate`` and ``aug.last_metrics`` (``{"augment/rate": ...}``) for logging.

Using it in a distillation loss (``atm/stages/distill.py``)::

    aug = build_augmentation(cfg.get("augment"), tokenizer=tokenizer, teacher=teacher)
    ...
    if aug is not None:
        batch = aug.at_step(batch, step)                  # or aug(batch, step_generator(aug.seed, step))
    if MIXUP_INDEX in batch:                              # mixup: each model mixes its OWN embeddings
        out_t = mixup_mlm_forward(teacher, batch, positions)   # under torch.no_grad()
        out_s = mixup_mlm_forward(student, batch, positions)
        hard = batch[MIXUP_LAMBDA] * mlm_ce(out_s, labels)     # labels of the first example, weight lambda
    else:
        ...                                               # unchanged: mlm_forward on batch["input_ids"]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from atm.errors import AtmError

__all__ = [
    "ALGORITHM_VERSION",
    "DEFAULTS",
    "KNOWN",
    "MIXUP_INDEX",
    "MIXUP_LAMBDA",
    "REPEAT_INDEX",
    "TOKEN_LEVEL",
    "Augmentation",
    "ContextualReplace",
    "MaskReplace",
    "Mixup",
    "RandomReplace",
    "Repeated",
    "TokenAugmentation",
    "augmentation_key",
    "build_augmentation",
    "eligible_positions",
    "mixup_embeddings",
    "mixup_mlm_forward",
    "parse_config",
    "special_token_ids",
    "step_generator",
]

#: Batch key added by ``mixup``: long ``[B]``, example i is mixed with example ``mixup_index[i]`` (!= i when B > 1).
MIXUP_INDEX = "mixup_index"
#: Batch key added by ``mixup``: float32 0-d tensor, the weight of example i itself (Beta(alpha, alpha) draw).
MIXUP_LAMBDA = "mixup_lambda"
#: Batch key added by ``repeated``: long ``[B*copies]``, the index of the source example of each row.
REPEAT_INDEX = "repeat_index"

#: Bumped whenever an augmentation draws differently for the same config, so cached teacher outputs
#: keyed by :func:`augmentation_key` are invalidated.
ALGORITHM_VERSION = 1

#: Token-level methods (also the allowed ``augment.inner`` of ``repeated``).
TOKEN_LEVEL = ("random_replace", "mask", "contextual")
#: Every ``augment.name``.
KNOWN = ("none", *TOKEN_LEVEL, "mixup", "repeated")

#: Default options per method; ``conf/augment/<name>.yaml`` holds the same values (checked by the tests).
DEFAULTS: dict[str, dict[str, Any]] = {
    "none": {},
    "random_replace": {"probability": 0.1, "seed": 0},
    "mask": {"probability": 0.1, "seed": 0},
    # TinyBERT replaces a word with probability p_t = 0.4 (sec. 4.2 / appendix); it uses K = 15 candidates.
    "contextual": {"probability": 0.4, "seed": 0, "top_k": 5, "sampling": "uniform"},
    "mixup": {"seed": 0, "alpha": 0.4},
    "repeated": {"probability": 0.1, "seed": 0, "copies": 2, "inner": "random_replace", "top_k": 5,
                 "sampling": "uniform"},
}
_COMMON = ("name", "probability", "seed")
_OPTIONS = {
    "none": (),
    "random_replace": (),
    "mask": (),
    "contextual": ("top_k", "sampling"),
    "mixup": ("alpha",),
    "repeated": ("copies", "inner", "top_k", "sampling"),
}
_SAMPLING = ("uniform", "teacher")


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AugmentSpec:
    """A validated ``augment`` config with every default filled in (see :func:`parse_config`)."""

    name: str
    probability: float = 0.0
    seed: int = 0
    top_k: int = 5
    sampling: str = "uniform"
    alpha: float = 0.4
    copies: int = 2
    inner: str = "random_replace"

    def canonical(self) -> dict[str, Any]:
        """The values that determine the augmented batches (what :func:`augmentation_key` hashes)."""
        if self.name == "none":
            return {"name": "none"}
        out: dict[str, Any] = {"name": self.name, "seed": self.seed}
        if self.name == "mixup":
            out["alpha"] = self.alpha
            return out
        out["probability"] = self.probability
        method = self.inner if self.name == "repeated" else self.name
        if self.name == "repeated":
            out.update(copies=self.copies, inner=self.inner)
        if method == "contextual":
            out.update(top_k=self.top_k, sampling=self.sampling)
        return out


def _to_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {"name": "none"}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise AtmError(f"augment must be a mapping with a 'name', got {type(cfg).__name__}")
    return dict(cfg)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AtmError(f"augment.{key}={value!r} must be a number")
    return float(value)


def _integer(key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        need = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise AtmError(f"augment.{key}={value!r} must be {need}")
    return int(value)


def parse_config(cfg: Any) -> AugmentSpec:
    """Validate an ``augment`` config (DictConfig, mapping or None = ``none``) and fill in the defaults.

    Raises:
        AtmError: unknown ``augment.name``; a key that is no option of that method; ``augment.probability``
            outside [0, 1]; ``seed`` not an integer; ``top_k`` or ``copies`` not a positive integer;
            ``sampling`` not ``uniform``/``teacher``; ``alpha`` not positive; ``inner`` not token-level.
    """
    d = _to_dict(cfg)
    name = d.get("name", "none")
    if name is None:
        name = "none"
    if name not in KNOWN:
        raise AtmError(f"augment.name={name!r} is not a known augmentation (known: {', '.join(KNOWN)})")
    allowed = _COMMON + _OPTIONS[name]
    for key in d:
        if key not in allowed:
            raise AtmError(f"augment.{key} is not an option of augment.name={name!r} "
                           f"(options: {', '.join(allowed)})")
    values = {**DEFAULTS[name], **{k: v for k, v in d.items() if k != "name" and v is not None}}
    spec: dict[str, Any] = {"name": name}
    if "probability" in values:
        p = _number("probability", values["probability"])
        if not 0.0 <= p <= 1.0:
            raise AtmError(f"augment.probability={values['probability']!r} must be a probability in [0, 1]")
        spec["probability"] = p
    if "seed" in values:
        spec["seed"] = _integer("seed", values["seed"])
    if "top_k" in values:
        spec["top_k"] = _integer("top_k", values["top_k"], 1)
    if "sampling" in values:
        if values["sampling"] not in _SAMPLING:
            raise AtmError(f"augment.sampling={values['sampling']!r} must be one of {', '.join(_SAMPLING)}")
        spec["sampling"] = values["sampling"]
    if "alpha" in values:
        alpha = _number("alpha", values["alpha"])
        if not alpha > 0.0:
            raise AtmError(f"augment.alpha={values['alpha']!r} must be positive (Beta(alpha, alpha))")
        spec["alpha"] = alpha
    if "copies" in values:
        spec["copies"] = _integer("copies", values["copies"], 1)
    if "inner" in values:
        if values["inner"] not in TOKEN_LEVEL:
            raise AtmError(f"augment.inner={values['inner']!r} must be a token-level augmentation "
                           f"({', '.join(TOKEN_LEVEL)})")
        spec["inner"] = values["inner"]
    return AugmentSpec(**spec)


def augmentation_key(cfg: Any) -> str:
    """A 16-hex-digit hash of what the augmentation draws: method, seed, p and the options that method reads
    (defaults filled in, so an explicit default and an absent key hash alike; unused options ignored).

    Together with the teacher's identity, the data order and the step it keys a teacher-output cache.
    ``none`` (or ``cfg=None``) always gives the same key.

    Raises:
        AtmError: as :func:`parse_config`.
    """
    canonical = {"version": ALGORITHM_VERSION, **parse_config(cfg).canonical()}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()[:16]


def step_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator of training step ``step`` for ``augment.seed`` = ``seed``: seeded from a hash of both,
    so nearby (seed, step) pairs give unrelated streams and the draw of a step never depends on earlier ones."""
    digest = hashlib.sha256(f"atm.augment:{int(seed)}:{int(step)}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


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
        if sampling not in _SAMPLING:
            raise AtmError(f"augment.sampling={sampling!r} must be one of {', '.join(_SAMPLING)}")
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


# ---------------------------------------------------------------------------------------- building


def _token_level(spec: AugmentSpec, method: str, tokenizer, teacher) -> TokenAugmentation:
    if method == "random_replace":
        return RandomReplace(tokenizer, spec.probability, spec.seed)
    if method == "mask":
        return MaskReplace(tokenizer, spec.probability, spec.seed)
    return ContextualReplace(tokenizer, teacher, spec.probability, spec.seed, top_k=spec.top_k,
                             sampling=spec.sampling)


def build_augmentation(cfg: Any, *, tokenizer, teacher=None) -> Augmentation | None:
    """The augmentation of the ``augment`` config node (``cfg.augment``; a DictConfig or mapping), or None
    for ``augment.name=none`` / ``cfg=None``.

    Config keys: ``name``; ``probability`` (p, token-level methods and ``repeated``); ``seed``; ``top_k``,
    ``sampling`` (``contextual``, or ``repeated`` with ``inner=contextual``); ``alpha`` (``mixup``);
    ``copies``, ``inner`` (``repeated``).  Absent keys take :data:`DEFAULTS`.

    Args:
        tokenizer: the teacher's (= student's) tokenizer.
        teacher: the frozen teacher MLM (needed only by ``contextual``).

    Raises:
        AtmError: see :func:`parse_config`; ``contextual`` without a teacher.
    """
    spec = parse_config(cfg)
    if spec.name == "none":
        return None
    if spec.name == "mixup":
        return Mixup(spec.alpha, spec.seed)
    if spec.name == "repeated":
        return Repeated(_token_level(spec, spec.inner, tokenizer, teacher), spec.copies, spec.seed)
    return _token_level(spec, spec.name, tokenizer, teacher)


# ------------------------------------------------------------------------------------- mixup forward


def mixup_embeddings(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor,
                     lam: float | torch.Tensor) -> torch.Tensor:
    """Mixed word embeddings ``inputs_embeds[B, T, D]`` of ``model`` for a mixup batch.

    ``lam * E[input_ids] + (1 - lam) * E[input_ids[index]]`` with ``E = model.get_input_embeddings()`` (the
    model's OWN table: call it once for the teacher and once for the student), set to zero where
    ``attention_mask`` is 0 (positions padding in both examples, which attention ignores anyway).

    Args:
        input_ids: long ``[B, T]``; index: long ``[B]`` (``batch["mixup_index"]``); lam: float or 0-d
            tensor (``batch["mixup_lambda"]``); attention_mask: ``[B, T]``, the union mask of the mixup
            batch (``batch["attention_mask"]`` after :class:`Mixup`).

    Feed the result as ``model.base_model(inputs_embeds=..., attention_mask=attention_mask)`` (see
    :func:`mixup_mlm_forward`).  With ``inputs_embeds`` RoBERTa numbers positions 0..T-1 from
    ``padding_idx + 1`` regardless of padding, which equals the ``input_ids`` numbering for right padding.
    """
    table = model.get_input_embeddings()
    ids = input_ids.to(table.weight.device)
    index = torch.as_tensor(index, device=ids.device)
    emb = table(ids)
    lam = torch.as_tensor(lam, dtype=emb.dtype, device=emb.device)
    mixed = lam * emb + (1 - lam) * table(ids[index])
    return mixed * attention_mask.to(device=emb.device, dtype=emb.dtype).unsqueeze(-1)


def mixup_mlm_forward(model, batch: Mapping[str, torch.Tensor], positions: torch.Tensor | None = None, *,
                      output_hidden_states: bool = False, output_attentions: bool = False) -> dict[str, Any]:
    """:func:`atm.models.encoder.mlm_forward` for a mixup batch: the encoder runs on
    :func:`mixup_embeddings` (``base_model(inputs_embeds=..., attention_mask=...)``) and the LM head only at
    ``positions`` (bool ``[B, T]``; None: every position).  Returns the same dict as ``mlm_forward``
    (``logits[N, V]``, ``hidden_states``, ``attentions``, ``attention_mask``, ``positions``).  Wrap the
    teacher's call in ``torch.no_grad()``."""
    mask = batch["attention_mask"]
    embeds = mixup_embeddings(model, batch["input_ids"], mask, batch[MIXUP_INDEX], batch[MIXUP_LAMBDA])
    enc = model.base_model(inputs_embeds=embeds, attention_mask=mask.to(embeds.device),
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions)
    if positions is None:
        positions = mask.new_ones(mask.shape, dtype=torch.bool)
    logits = model.lm_head(enc.last_hidden_state[positions.to(embeds.device)])
    return {"logits": logits, "hidden_states": enc.hidden_states, "attentions": enc.attentions,
            "attention_mask": mask, "positions": positions}
