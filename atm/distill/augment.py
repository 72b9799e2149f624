"""Data augmentation for distillation: transform an MLM batch before teacher and student see it.

Distillation transfers more when the student sees inputs off the training distribution on which the
teacher's outputs are still informative (TinyBERT, Jiao et al. 2020, sec. 3.1 "Data Augmentation";
Distiller, He et al. 2021, sec. 3.4).  An :class:`~atm.distill.augmentations.Augmentation` maps a batch of
:func:`atm.data.collate.mlm_collator` -- ``input_ids[B,T]``, ``attention_mask[B,T]``, ``labels[B,T]``
(-100 off the masked positions) -- to an augmented batch that BOTH teacher and student are then run on.
Config group ``augment`` (``conf/augment/<name>.yaml``), checked by :func:`parse_config` and built by
:func:`build_augmentation`; this module also holds the batch keys, :func:`augmentation_key`,
:func:`step_generator` and the mixup forward pass, while the transforms themselves are the classes of
:mod:`atm.distill.augmentations`:

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
from typing import TYPE_CHECKING, Any

import torch

from atm.errors import AtmError

if TYPE_CHECKING:
    from atm.distill.augmentations import Augmentation, TokenAugmentation

__all__ = [
    "ALGORITHM_VERSION",
    "DEFAULTS",
    "KNOWN",
    "MIXUP_INDEX",
    "MIXUP_LAMBDA",
    "REPEAT_INDEX",
    "SAMPLING",
    "TOKEN_LEVEL",
    "AugmentSpec",
    "augmentation_key",
    "build_augmentation",
    "mixup_embeddings",
    "mixup_mlm_forward",
    "parse_config",
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
#: ``augment.sampling`` of ``contextual``: how a replacement is drawn from the teacher's top k.
SAMPLING = ("uniform", "teacher")


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
        if values["sampling"] not in SAMPLING:
            raise AtmError(f"augment.sampling={values['sampling']!r} must be one of {', '.join(SAMPLING)}")
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


# ---------------------------------------------------------------------------------------- building


def _token_level(spec: AugmentSpec, method: str, tokenizer, teacher) -> TokenAugmentation:
    from atm.distill.augmentations import ContextualReplace, MaskReplace, RandomReplace

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
    from atm.distill.augmentations import Mixup, Repeated  # imports this module (batch keys, step_generator)

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
