"""Task heads over a pre-LN RoBERTa encoder: joint intent/slot model, XNLI pair classifier, label alignment.

- :class:`JointIntentSlotModel` -- intent classification + slot filling over one encoder, in the
  style of the alexa/massive baselines (FitzGerald et al., 2022, "MASSIVE"): an intent head on a
  pooled sentence vector and a token-level slot head whose labels sit on each word's first sub-token.
- :func:`build_pair_classifier` -- ``RobertaPreLayerNormForSequenceClassification`` for XNLI
  (Conneau et al., 2018), initialised from an MLM checkpoint.
- :func:`align_word_labels` / :func:`word_predictions` -- word <-> sub-token label mapping via the
  fast tokenizer's ``word_ids()``.

Both models save and load with ``save_pretrained`` / ``from_pretrained`` (safetensors);
``AutoConfig`` / ``AutoModel`` know the joint model once this module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    RobertaPreLayerNormConfig,
    RobertaPreLayerNormForSequenceClassification,
    RobertaPreLayerNormModel,
)
from transformers.models.roberta_prelayernorm.modeling_roberta_prelayernorm import (
    RobertaPreLayerNormPreTrainedModel,
)
from transformers.utils import ModelOutput

from atm.errors import AtmError

__all__ = [
    "IGNORE_INDEX",
    "POOLINGS",
    "XNLI_LABELS",
    "JointIntentSlotConfig",
    "JointIntentSlotModel",
    "JointIntentSlotOutput",
    "align_word_labels",
    "build_pair_classifier",
    "encoder_config_kwargs",
    "load_joint_model",
    "load_pair_classifier",
    "word_predictions",
]

#: Label value ignored by the losses (PyTorch's ``CrossEntropyLoss`` default).
IGNORE_INDEX = -100
#: Sentence pooling choices of the intent head.
POOLINGS = ("first", "mean", "max")
#: XNLI label names in the order of the integer labels of the XNLI data (0, 1, 2).
XNLI_LABELS = ("entailment", "neutral", "contradiction")


def encoder_config_kwargs(config: Any) -> dict[str, Any]:
    """The architecture fields of a pre-LN RoBERTa config (what defines the encoder's weights).

    Returns the fields declared by ``RobertaPreLayerNormConfig`` itself (vocab, sizes, dropouts,
    special-token ids, ...), so that a task config can be built with exactly the encoder of an MLM.
    """
    names = [n for n in RobertaPreLayerNormConfig.__annotations__ if not n.startswith("_")]
    return {n: getattr(config, n) for n in names if hasattr(config, n)}


def _as_mlm(mlm_model_or_path):
    """An MLM model from a model or a checkpoint path (checked by :func:`atm.models.encoder.load_mlm`)."""
    if isinstance(mlm_model_or_path, (str, os.PathLike)):
        from atm.models.encoder import load_mlm

        return load_mlm(mlm_model_or_path)
    if isinstance(mlm_model_or_path, RobertaPreLayerNormPreTrainedModel) and hasattr(
        mlm_model_or_path, "roberta_prelayernorm"
    ):
        return mlm_model_or_path
    if isinstance(mlm_model_or_path, RobertaPreLayerNormModel):
        return mlm_model_or_path
    raise AtmError(
        f"expected a pre-LN RoBERTa model or a checkpoint path, got {type(mlm_model_or_path).__name__}"
    )


def _encoder_of(model) -> RobertaPreLayerNormModel:
    return model if isinstance(model, RobertaPreLayerNormModel) else model.roberta_prelayernorm


def _label_list(labels: Sequence[str] | None, what: str) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
        raise AtmError(f"{what} must be a list of label names (strings)")
    labels = list(labels)
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise AtmError(f"{what}: duplicate label {dup!r}")
    return labels


# ------------------------------------------------------------------------------------ joint model


class JointIntentSlotConfig(RobertaPreLayerNormConfig):
    """Config of :class:`JointIntentSlotModel`: a pre-LN RoBERTa encoder config plus the task fields.

    Extra fields:
        intent_labels / slot_labels: label names (index = class id); when given they fix
            ``num_intents`` / ``num_slot_labels``.  Slot labels are BIO tags (``"O"``, ``"B-date"``...).
        num_intents / num_slot_labels: number of classes of each head (derived from the label names
            when those are given; required otherwise).
        slot_loss_coef: weight of the slot loss, ``loss = intent_ce + slot_loss_coef * slot_ce``.
        pooling: sentence vector for the intent head: ``"first"`` (the ``<s>`` token), ``"mean"`` or
            ``"max"`` over non-padding tokens.
        intent_layer: which hidden layer the intent head pools, an index into the encoder's
            ``hidden_states`` (``L + 1`` entries, embeddings first): ``-1`` (default) is the last layer,
            ``0`` the embeddings, ``-2`` the layer below the last. The slot head always reads the last layer.
        freeze_encoder: train only the two heads (encoder parameters get ``requires_grad=False``).
    """

    model_type = "atm-joint-intent-slot"

    num_intents: int | None = None
    num_slot_labels: int | None = None
    intent_labels: list[str] | None = None
    slot_labels: list[str] | None = None
    slot_loss_coef: float = 1.0
    pooling: str = "first"
    intent_layer: int = -1
    freeze_encoder: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.intent_labels = _label_list(self.intent_labels, "intent_labels")
        self.slot_labels = _label_list(self.slot_labels, "slot_labels")
        for labels, key, what in (
            (self.intent_labels, "num_intents", "intent_labels"),
            (self.slot_labels, "num_slot_labels", "slot_labels"),
        ):
            v = getattr(self, key)
            if labels is not None:
                if v is not None and v != len(labels):
                    raise AtmError(f"{key}={v} disagrees with the {len(labels)} names in {what}")
                setattr(self, key, len(labels))
            elif v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise AtmError(f"{key} must be a positive integer, got {v!r}")
        if self.pooling not in POOLINGS:
            raise AtmError(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        coef = self.slot_loss_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
            raise AtmError(f"slot_loss_coef must be a number >= 0, got {self.slot_loss_coef!r}")
        self.slot_loss_coef = float(self.slot_loss_coef)
        if not isinstance(self.freeze_encoder, bool):
            raise AtmError(f"freeze_encoder must be true or false, got {self.freeze_encoder!r}")
        n_states = self.num_hidden_layers + 1
        layer = self.intent_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_states <= layer < n_states:
            raise AtmError(f"intent_layer must be an integer index into the {n_states} hidden states "
                           f"(embeddings + {self.num_hidden_layers} layers: {-n_states}..{n_states - 1}), "
                           f"got {layer!r}")


# Fields a caller may set through JointIntentSlotModel.from_encoder(**opts).
_JOINT_OPTS = ("slot_loss_coef", "pooling", "intent_layer", "freeze_encoder", "classifier_dropout", "hidden_dropout_prob",
               "attention_probs_dropout_prob")


@dataclass
class JointIntentSlotOutput(ModelOutput):
    """Output of :class:`JointIntentSlotModel`.

    Attributes:
        loss: scalar, ``intent_loss + slot_loss_coef * slot_loss`` over the label kinds given.
        intent_logits: ``[B, num_intents]``.
        slot_logits: ``[B, T, num_slot_labels]``.
        intent_loss / slot_loss: the two mean cross-entropies (scalars) when their labels are given.
        hidden_states: with ``output_hidden_states=True``: tuple of ``L + 1`` tensors ``[B, T, H]``,
            embeddings first.
        attentions: with ``output_attentions=True`` (eager attention): ``L`` tensors ``[B, heads, T, T]``.
    """

    loss: torch.FloatTensor | None = None
    intent_logits: torch.FloatTensor | None = None
    slot_logits: torch.FloatTensor | None = None
    intent_loss: torch.FloatTensor | None = None
    slot_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class JointIntentSlotModel(RobertaPreLayerNormPreTrainedModel):
    """Intent classification + slot filling over one pre-LN RoBERTa encoder.

    Architecture: ``encoder -> hidden states``; with ``h_k [B, T, H]`` the layer ``config.intent_layer``
    (default the last) and ``h [B, T, H]`` the last layer, intent logits = ``Linear(dropout(pool(h_k)))``
    with ``pool`` from ``config.pooling`` and slot logits = ``Linear(dropout(h))`` per token.
    The encoder submodule is called ``roberta_prelayernorm`` like in every transformers pre-LN RoBERTa
    model, so encoder weights keep the same names as in the MLM checkpoint.
    """

    config_class = JointIntentSlotConfig
    config: JointIntentSlotConfig

    def __init__(self, config: JointIntentSlotConfig):
        super().__init__(config)
        for key, what in (("num_intents", "intent_labels"), ("num_slot_labels", "slot_labels")):
            if getattr(config, key) is None:
                raise AtmError(f"JointIntentSlotConfig needs {what} or {key}")
        self.roberta_prelayernorm = RobertaPreLayerNormModel(config, add_pooling_layer=False)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.intent_classifier = nn.Linear(config.hidden_size, config.num_intents)
        self.slot_classifier = nn.Linear(config.hidden_size, config.num_slot_labels)
        self.post_init()
        self.set_encoder_frozen(config.freeze_encoder)

    def set_encoder_frozen(self, frozen: bool = True) -> None:
        """Freeze (``requires_grad=False``) or unfreeze the encoder; records it in the config.

        A frozen encoder also runs under ``torch.no_grad()`` in :meth:`forward`; its dropout still
        follows ``train()`` / ``eval()``.
        """
        self.config.freeze_encoder = bool(frozen)
        for param in self.roberta_prelayernorm.parameters():
            param.requires_grad_(not frozen)

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "first":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        if self.config.pooling == "mean":
            return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        filled = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min)
        return filled.max(1).values

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        intent_labels: torch.LongTensor | None = None,
        slot_labels: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> JointIntentSlotOutput:
        """Logits and (with labels) the joint loss.

        Args:
            input_ids: ``[B, T]`` token ids (``<s> ... </s>`` then ``<pad>``).
            attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding (default: all ones).
            intent_labels: ``[B]`` intent class ids.
            slot_labels: ``[B, T]`` slot class ids on each word's first sub-token and
                ``-100`` (:data:`IGNORE_INDEX`) on other sub-tokens, special tokens and padding
                (see :func:`align_word_labels`).
            kwargs: passed to the encoder (``output_hidden_states``, ``output_attentions``).

        Returns:
            :class:`JointIntentSlotOutput`; ``loss`` is ``None`` without labels.
        """
        n_states = self.config.num_hidden_layers + 1
        from_last = self.config.intent_layer % n_states == n_states - 1
        if not from_last:
            kwargs["output_hidden_states"] = True
        encoder_kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        if self.config.freeze_encoder:
            with torch.no_grad():
                out = self.roberta_prelayernorm(**encoder_kwargs)
        else:
            out = self.roberta_prelayernorm(**encoder_kwargs)
        hidden = out.last_hidden_state  # [B, T, H]
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        intent_hidden = hidden if from_last else out.hidden_states[self.config.intent_layer]
        pooled = self._pool(intent_hidden, attention_mask)  # [B, H]
        intent_logits = self.intent_classifier(self.dropout(pooled))  # [B, n_intents]
        slot_logits = self.slot_classifier(self.dropout(hidden))  # [B, T, n_slots]

        ce = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        intent_loss = slot_loss = loss = None
        if intent_labels is not None:
            intent_loss = ce(intent_logits, intent_labels.to(intent_logits.device).view(-1))
            loss = intent_loss
        if slot_labels is not None:
            slot_labels = slot_labels.to(slot_logits.device)
            if slot_labels.shape != slot_logits.shape[:2]:
                raise AtmError(
                    f"slot_labels shape {tuple(slot_labels.shape)} does not match input shape "
                    f"{tuple(slot_logits.shape[:2])}"
                )
            if (slot_labels != IGNORE_INDEX).any():
                slot_loss = ce(slot_logits.reshape(-1, slot_logits.shape[-1]), slot_labels.reshape(-1))
            else:  # no labelled token: CE would be NaN; contribute zero (keeps the graph)
                slot_loss = slot_logits.sum() * 0.0
            weighted = self.config.slot_loss_coef * slot_loss
            loss = weighted if loss is None else loss + weighted
        return JointIntentSlotOutput(
            loss=loss,
            intent_logits=intent_logits,
            slot_logits=slot_logits,
            intent_loss=intent_loss,
            slot_loss=slot_loss,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    @classmethod
    def from_encoder(
        cls,
        mlm_model_or_path,
        intent_labels: Sequence[str],
        slot_labels: Sequence[str],
        **opts,
    ) -> JointIntentSlotModel:
        """A joint model whose encoder is copied from a pretrained MLM (model or checkpoint path).

        The encoder weights (``roberta_prelayernorm.*``: embeddings, layers, final LayerNorm) are
        copied exactly; the LM head is dropped; the two heads are freshly initialised.

        Args:
            mlm_model_or_path: ``RobertaPreLayerNormForMaskedLM`` (or any pre-LN RoBERTa model with a
                ``roberta_prelayernorm`` encoder), or a checkpoint directory (:func:`load_mlm`).
            intent_labels / slot_labels: label names; their order defines the class ids.
            opts: any of ``slot_loss_coef``, ``pooling``, ``intent_layer``, ``freeze_encoder``, ``classifier_dropout``,
                ``hidden_dropout_prob``, ``attention_probs_dropout_prob``.

        Raises:
            AtmError: unknown option, bad labels, or a model/path that is not a pre-LN RoBERTa MLM.
        """
        for key in opts:
            if key not in _JOINT_OPTS:
                raise AtmError(f"unknown joint model option {key!r} (allowed: {', '.join(_JOINT_OPTS)})")
        mlm = _as_mlm(mlm_model_or_path)
        kwargs = encoder_config_kwargs(mlm.config)
        kwargs["tie_word_embeddings"] = False
        kwargs.update(opts)
        attn = getattr(mlm.config, "_attn_implementation", None)
        config = JointIntentSlotConfig(
            **kwargs,
            intent_labels=list(intent_labels),
            slot_labels=list(slot_labels),
            **({"attn_implementation": attn} if attn else {}),
        )
        model = cls(config)
        model.roberta_prelayernorm.load_state_dict(_encoder_of(mlm).state_dict())
        model.set_encoder_frozen(config.freeze_encoder)
        return model


def load_joint_model(path: str | os.PathLike) -> JointIntentSlotModel:
    """Load a :class:`JointIntentSlotModel` saved with ``save_pretrained`` / ``save_checkpoint``.

    The tokenizer in the directory (if any) is checked against the model's vocabulary; the frozen
    state of the encoder is restored from the config.

    Raises:
        AtmError: missing directory/config, another model type, or a mismatching tokenizer.
    """
    return _load_task_model(
        path, JointIntentSlotModel, JointIntentSlotConfig.model_type, "joint intent/slot model"
    )


def _load_task_model(path, model_cls, model_type: str, what: str):
    from atm.models.encoder import load_pretrained

    model = load_pretrained(path, model_cls, model_type, what)
    if isinstance(model, JointIntentSlotModel):
        model.set_encoder_frozen(model.config.freeze_encoder)
    return model


# ------------------------------------------------------------------------------ pair classifier


def build_pair_classifier(
    mlm_path_or_model,
    num_labels: int = 3,
    *,
    labels: Sequence[str] | None = None,
    classifier_dropout: float | None = None,
) -> RobertaPreLayerNormForSequenceClassification:
    """``RobertaPreLayerNormForSequenceClassification`` for sentence pairs (XNLI), encoder from an MLM.

    Inputs are ``tokenizer(premise, hypothesis)`` = ``<s> premise </s></s> hypothesis </s>``; the
    head (transformers' RoBERTa classification head: dense + tanh + projection on the ``<s>`` state)
    gives ``logits [B, num_labels]``; with ``labels [B]`` the loss is cross-entropy.

    Args:
        mlm_path_or_model: pretrained MLM model or checkpoint directory; encoder weights are copied.
        num_labels: number of classes (3 for XNLI).
        labels: class names in class-id order; default :data:`XNLI_LABELS` when ``num_labels == 3``.
        classifier_dropout: dropout of the head (default: the encoder's hidden dropout).

    Raises:
        AtmError: ``labels`` length differs from ``num_labels``, or not a pre-LN RoBERTa MLM.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise AtmError(f"num_labels must be an integer >= 2, got {num_labels!r}")
    if labels is None:
        labels = list(XNLI_LABELS) if num_labels == 3 else [f"LABEL_{i}" for i in range(num_labels)]
    labels = _label_list(labels, "labels")
    if len(labels) != num_labels:
        raise AtmError(f"labels has {len(labels)} names but num_labels={num_labels}")
    mlm = _as_mlm(mlm_path_or_model)
    kwargs = encoder_config_kwargs(mlm.config)
    kwargs["tie_word_embeddings"] = False
    if classifier_dropout is not None:
        kwargs["classifier_dropout"] = float(classifier_dropout)
    attn = getattr(mlm.config, "_attn_implementation", None)
    config = RobertaPreLayerNormConfig(
        **kwargs,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="single_label_classification",
        **({"attn_implementation": attn} if attn else {}),
    )
    model = RobertaPreLayerNormForSequenceClassification(config)
    model.roberta_prelayernorm.load_state_dict(_encoder_of(mlm).state_dict())
    return model


def load_pair_classifier(path: str | os.PathLike) -> RobertaPreLayerNormForSequenceClassification:
    """Load a pair classifier saved with ``save_pretrained`` / ``save_checkpoint`` (tokenizer checked).

    Raises:
        AtmError: missing directory/config, another model type, or a mismatching tokenizer.
    """
    return _load_task_model(
        path, RobertaPreLayerNormForSequenceClassification, "roberta-prelayernorm", "pre-LN RoBERTa pair classifier"
    )


# ---------------------------------------------------------------------------------- alignment


def align_word_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """Per-token labels: each word's label on its FIRST sub-token, ``-100`` everywhere else.

    Args:
        word_ids: the fast tokenizer's ``encoding.word_ids()`` for one sequence encoded with
            ``is_split_into_words=True`` (``None`` for special tokens and padding).
        word_labels: one label id per word of the original word list.

    Returns:
        A list as long as ``word_ids``: ``word_labels[w]`` at the first sub-token of word ``w``,
        :data:`IGNORE_INDEX` (-100) on continuation sub-tokens, special tokens and padding.  Words
        cut off by truncation simply get no token.

    Raises:
        AtmError: a word id outside ``word_labels``.
    """
    out: list[int] = []
    prev: int | None = None
    for wid in word_ids:
        if wid is None:
            out.append(IGNORE_INDEX)
        elif wid != prev:
            if not 0 <= wid < len(word_labels):
                raise AtmError(f"word id {wid} has no label ({len(word_labels)} word labels)")
            out.append(int(word_labels[wid]))
        else:
            out.append(IGNORE_INDEX)
        prev = wid
    return out


def word_predictions(
    word_ids: Sequence[int | None],
    token_pred: Sequence[int],
    *,
    n_words: int | None = None,
    fill: int = IGNORE_INDEX,
) -> list[int]:
    """Per-word predictions: the prediction at each word's first sub-token (inverse of alignment).

    Args:
        word_ids: as for :func:`align_word_labels`.
        token_pred: one predicted label id per token (e.g. ``slot_logits.argmax(-1)[i].tolist()``).
        n_words: number of words of the original sentence (default: ``max(word_ids) + 1``, which leaves
            out trailing words without a token); words without a token get ``fill``.
        fill: prediction for words without a token: words cut off by truncation, and words the tokenizer
            reduces to nothing (a lone zero-width space, U+200B, in MASSIVE my-MM and zh-CN). The default
            ``-100`` is no label id: map it explicitly (``atm.tasks.massive.predict`` predicts ``"O"``), never
            index a label list with it (``labels[-100]`` is a real label by negative indexing).

    Raises:
        AtmError: ``word_ids`` and ``token_pred`` differ in length.
    """
    if len(word_ids) != len(token_pred):
        raise AtmError(f"word_ids has {len(word_ids)} entries but token_pred has {len(token_pred)}")
    seen = [w for w in word_ids if w is not None]
    if n_words is None:
        n_words = max(seen) + 1 if seen else 0
    out = [fill] * n_words
    done: set[int] = set()
    for wid, pred in zip(word_ids, token_pred):
        if wid is None or wid in done or wid >= n_words:
            continue
        out[wid] = int(pred)
        done.add(wid)
    return out


AutoConfig.register(JointIntentSlotConfig.model_type, JointIntentSlotConfig, exist_ok=True)
AutoModel.register(JointIntentSlotConfig, JointIntentSlotModel, exist_ok=True)
