"""Sizes and memory of atm's model presets at paper scale, without a GPU (``analysis/bench_scale.py``).

Everything here is arithmetic on a model preset (``conf/model/<name>.yaml``) or on a model built on PyTorch's
``meta`` device (shapes, no storage), so the 9B teacher costs nothing to size. Units: parameter counts are
numbers of scalars; memory is bytes (``GiB`` = 2**30 bytes where printed).

Model states per GPU (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", sec. 3.1 and fig. 1), for Ψ parameters on N GPUs:

* mixed precision (bf16/fp16) Adam: 16-bit weights 2Ψ, 16-bit gradients 2Ψ, optimizer states KΨ with K = 12
  (fp32 master weights, first and second moment);
* fp32 Adam: weights 4Ψ, gradients 4Ψ, optimizer states KΨ with K = 8 (the two moments);
* ZeRO stage 1 divides the optimizer states by N, stage 2 also the gradients, stage 3 also the weights
  (stage 0: plain data parallelism, every GPU holds everything).

atm's plain PyTorch backend under bf16 autocast keeps fp32 weights and gradients (4Ψ + 4Ψ + 8Ψ): the same 16Ψ in
total as the mixed-precision split above.

DeepSpeed's own estimators (``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs`` and
``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``, the functions behind their
``*_all_cold`` printers), without offload, count 18 bytes per partitioned parameter (2 16-bit gradients + 4
fp32 gradients + 4 fp32 weights + 8 moments) plus, for stage 2, the unpartitioned 16-bit weights 2Ψ, and for
stage 3 the fp32 copy of the largest layer gathered at once (4 x its parameters): :func:`deepspeed_model_states`
restates them so that the table can show them when DeepSpeed is not installed.

Activations per transformer layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", sec. 4.1, eq. 1), for sequence length s, micro-batch b, hidden size h, a heads, 16-bit
activations and 1-byte dropout masks: ``s b h (34 + 5 a s / h)`` bytes. Of the 34 s b h, 2 s b h are the two
dropout masks (1 byte per element) and 32 s b h are 16-bit tensors; of the 5 a s^2 b, a s^2 b is the attention
dropout mask and 4 a s^2 b are 16-bit. In fp32 the 16-bit tensors double: ``s b h (66 + 9 a s / h)``. It is
an upper bound for atm: eager attention with dropout (SDPA's fused kernels on a GPU keep no a s^2 b scores, and
Stage 1 trains without dropout). Outside the layers (Korthikanti sec. 4.3) the embedding dropout mask (s b h
bytes) and the final LayerNorm, LM head and cross-entropy, 4 s b h (1 + f v / h) bytes in 16 bits with f the
fraction of positions the LM head runs at (atm: the 15% masked ones, ``atm.models.encoder.mlm_forward``) and v
the vocabulary. With full activation checkpointing (``trainer.activation_checkpointing``, Hugging Face gradient
checkpointing: Korthikanti sec. 4.1, "full recomputation") each layer keeps only its 16-bit input, 2 s b h, and
one layer's activations are live again while it is recomputed in the backward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GIB = 2**30
#: atm's fixed special-token ids (``atm.models.tokenizer``): ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2.
_BOS, _PAD, _EOS = 0, 1, 2
#: Share of positions the LM head runs at during MLM pretraining (``stage.mlm_probability``).
MLM_FRACTION = 0.15
#: Paper presets (FitzGerald et al., KDD 2022), smallest first; the CPU ones follow them in the tables.
PAPER_PRESETS = ("student_17m", "student_170m", "teacher_700m", "teacher_2b", "teacher_9b")
#: Bytes per parameter (weights, gradients, optimizer states) of Adam, ZeRO paper sec. 3.1.
STATE_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}


class VocabOnly:
    """Stands in for a tokenizer in :func:`atm.models.encoder.build_mlm`: a length (the vocabulary size) and
    atm's special-token ids, nothing to tokenize with."""

    pad_token_id, bos_token_id, eos_token_id = _PAD, _BOS, _EOS

    def __init__(self, size: int):
        self.size = int(size)

    def __len__(self) -> int:
        return self.size


@dataclass(frozen=True)
class Shape:
    """What the memory formulas need of a model: ``params`` (unique, tied weights once), ``non_embedding``
    (the paper's count, :func:`atm.models.encoder.count_parameters`), ``largest_layer`` (parameters of the
    module that directly holds the most, DeepSpeed's ``model_to_params``), layers, hidden size, heads and the
    vocabulary size."""

    name: str
    params: int
    non_embedding: int
    largest_layer: int
    layers: int
    hidden: int
    heads: int
    vocab: int


def meta_model(preset: Mapping[str, Any], vocab_size: int):
    """``RobertaPreLayerNormForMaskedLM`` of ``preset`` built by :func:`atm.models.encoder.build_mlm` on the
    ``meta`` device: every parameter has its shape and no storage.

    Raises:
        atm.errors.AtmError: a bad preset or vocabulary size (:func:`atm.models.encoder.make_config`).
    """
    import torch

    from atm.models.encoder import build_mlm

    with torch.device("meta"):
        return build_mlm(preset, VocabOnly(vocab_size), seed=0)


def shape_of(name: str, model) -> Shape:
    """The :class:`Shape` of a built model (on any device, ``meta`` included)."""
    from atm.models.encoder import count_parameters

    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    c = model.config
    return Shape(name, count_parameters(model), count_parameters(model, non_embedding=True), largest,
                 c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.vocab_size)


def model_states(params: int, precision: str, zero_stage: int, gpus: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes per GPU of Adam training ``params`` parameters on
    ``gpus`` GPUs under ZeRO stage ``zero_stage`` (ZeRO paper sec. 3.1: 2Ψ + 2Ψ + 12Ψ in mixed precision,
    4Ψ + 4Ψ + 8Ψ in fp32; stage 1 divides the optimizer states by N, 2 also the gradients, 3 also the weights).

    Raises:
        ValueError: unknown precision, a stage outside 0-3 or fewer than one GPU.
    """
    if precision not in STATE_BYTES:
        raise ValueError(f"precision must be one of {', '.join(STATE_BYTES)}, got {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus!r}")
    w, g, k = STATE_BYTES[precision]
    return (w * params / (gpus if zero_stage >= 3 else 1), g * params / (gpus if zero_stage >= 2 else 1),
            k * params / (gpus if zero_stage >= 1 else 1))


def deepspeed_model_states(params: int, largest_layer: int, zero_stage: int, gpus: int) -> int | None:
    """Bytes per GPU of DeepSpeed's estimator without offload (one node of ``gpus`` GPUs): stage 2
    ``2Ψ + int(18Ψ / N)``, stage 3 ``4 largest_layer + int(18Ψ / N)``; None for stages 0 and 1 (DeepSpeed has
    no estimator for them). Restates ``estimate_zero2_model_states_mem_needs`` /
    ``estimate_zero3_model_states_mem_needs`` (DeepSpeed 0.19, ``cpu_offload=False``) so that it needs no
    DeepSpeed; :func:`deepspeed_estimator` calls DeepSpeed itself."""
    if zero_stage == 2:
        return 2 * params + int(18 * params / gpus)
    if zero_stage == 3:
        return 4 * largest_layer + int(18 * params / gpus)
    return None


def deepspeed_estimator(params: int, largest_layer: int, zero_stage: int, gpus: int) -> int | None:
    """GPU bytes DeepSpeed's own estimator gives (no offload, one node), or None for stages 0-1 or when
    DeepSpeed is not installed."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs,
        )
    except ImportError:
        return None
    if zero_stage == 2:
        return estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=False)[1]
    if zero_stage == 3:
        return estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=gpus,
                                                     cpu_offload=False, cpu_offload_params=False)[1]
    return None


def layer_activations(seq_len: int, batch: int, hidden: int, heads: int, precision: str) -> float:
    """Bytes of activations one transformer layer keeps for the backward pass: Korthikanti et al. 2022 eq. 1,
    ``s b h (34 + 5 a s / h)`` with 16-bit activations; ``s b h (66 + 9 a s / h)`` in fp32 (the 16-bit tensors
    doubled, the 1-byte dropout masks not; module doc)."""
    s, b, h, a = seq_len, batch, hidden, heads
    linear, quadratic = (34, 5) if precision != "fp32" else (66, 9)
    return s * b * h * (linear + quadratic * a * s / h)


def activations(shape: Shape, seq_len: int, batch: int, precision: str, checkpointing: bool = False,
                lm_fraction: float = MLM_FRACTION) -> float:
    """Bytes of activations of one micro-batch ``[batch, seq_len]`` of MLM training (module doc): L layers of
    :func:`layer_activations` (with ``checkpointing``: L layer inputs of 2 s b h bytes, 4 in fp32, plus one layer
    recomputed), the embedding dropout mask s b h and the head, 4 s b h (1 + f v / h) (8 in fp32)."""
    s, b, h = seq_len, batch, shape.hidden
    unit = 2 if precision != "fp32" else 4
    layer = layer_activations(s, b, h, shape.heads, precision)
    body = shape.layers * unit * s * b * h + layer if checkpointing else shape.layers * layer
    return body + s * b * h + 2 * unit * s * b * h * (1 + lm_fraction * shape.vocab / h)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU of one configuration (:func:`memory`); ``deepspeed``: DeepSpeed's estimate of the model
    states (stages 2-3, else None); ``fits``/``fits_ckpt``: the larger model-state estimate plus activations plus
    the reserve is at most the GPU's memory without / with activation checkpointing; ``max_batch``/``max_batch_ckpt``: the
    largest micro-batch that still fits (0: not even one sequence)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_ckpt: float
    deepspeed: int | None
    fits: bool
    fits_ckpt: bool
    max_batch: int
    max_batch_ckpt: int

    @property
    def states(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.states + self.activations_ckpt


def memory(shape: Shape, *, zero_stage: int, gpus: int, precision: str, batch: int, seq_len: int,
           gpu_bytes: float, reserve_bytes: float) -> Memory:
    """Per-GPU memory of training ``shape`` with micro-batch ``batch`` x ``seq_len`` (:func:`model_states`,
    :func:`activations`). ``reserve_bytes`` stands for what the formulas leave out (CUDA context, kernels'
    workspaces, allocator fragmentation); a configuration fits when its activations plus the reserve plus the
    larger of the two model-state estimates (ZeRO paper; DeepSpeed's, for stages 2-3) is at most ``gpu_bytes``.

    Raises:
        ValueError: see :func:`model_states`.
    """
    w, g, o = model_states(shape.params, precision, zero_stage, gpus)
    ds = deepspeed_model_states(shape.params, shape.largest_layer, zero_stage, gpus)
    room = gpu_bytes - reserve_bytes - max(w + g + o, ds or 0)

    def max_batch(ckpt: bool) -> int:
        per = activations(shape, seq_len, 1, precision, ckpt)  # linear in b
        return max(0, int(room // per)) if room > 0 else 0

    act, act_ckpt = (activations(shape, seq_len, batch, precision, ckpt) for ckpt in (False, True))
    return Memory(w, g, o, act, act_ckpt, ds, fits=room >= act, fits_ckpt=room >= act_ckpt, max_batch=max_batch(False),
                  max_batch_ckpt=max_batch(True))
