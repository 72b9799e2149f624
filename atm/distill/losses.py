"""The one loss registry. Each loss is registered by name and kind with :func:`register_loss`.

Conventions: teacher tensors end in ``_t``, student tensors in ``_s``. Every loss returns a scalar mean
(float32); counts are formed in int64 and sums in float32, whatever the input dtype (a bf16 count of 2,251
tokens would round to 2,256), and a mean over an empty selection (no masked token, no real token) is 0,
not NaN. The kinds and their call signatures:

* ``hard``: ``(logits_s[..., V], labels[...])``.
* ``logit``: ``(logits_s[N, C], logits_t[N, C], temperature)`` (N positions or examples, C classes or
  vocabulary entries).
* ``hidden``: ``(h_s[B, T, D], h_t[B, T, D], mask[B, T])``, per-token states; the student is already
  projected to the teacher's width; ``mask`` is 1 for real tokens.
* ``pooled``: ``(z_s[B, D_s], z_t[B, D_t])``, one vector per sequence (the [CLS]/first-token state of a
  mapped layer). Plain pooled functions assume ``D_s == D_t`` (the objective projects); trainable ones
  take both widths.
* ``attention``: ``(a_s[B, H, T, T], a_t[B, H, T, T], mask[B, T])``, pre-softmax attention SCORES
  (``q k^T / sqrt(d_head)`` plus the additive padding mask, see :mod:`atm.models.attention`); equal head
  counts (use :func:`merge_heads` first when they differ).

A loss is either a plain function, or -- when it has parameters of its own (a critic, a baseline) -- an
``nn.Module`` class registered with ``trainable=True`` and constructed as ``cls(d_s, d_t, **options)``.
:func:`build_loss` turns either into a module called as ``module(student, teacher, mask=None)``; trainable
losses are trained in the student's optimiser and never saved with the student (the objective owns them).
Adding a loss is one decorated function or class here plus its golden-value test.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atm.distill.critics import Baseline, SeparableCritic
from atm.errors import AtmError

KINDS = ("hard", "logit", "hidden", "pooled", "attention")
#: Kinds whose losses take a ``mask[B, T]`` as third argument.
MASKED_KINDS = ("hidden", "attention")


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its name, kind (one of :data:`KINDS`) and implementation.

    ``fn`` is a plain function, or, when ``trainable`` is true, an ``nn.Module`` class constructed as
    ``fn(d_s, d_t, **options)`` whose ``forward`` has the kind's call signature (see :func:`build_loss`).
    """

    name: str
    kind: str
    fn: Callable[..., Any]
    trainable: bool = False


LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, kind: str, trainable: bool = False) -> Callable:
    """Decorator: register a function (or, with ``trainable=True``, an ``nn.Module`` class) as loss
    ``name`` of ``kind`` (one of :data:`KINDS`)."""
    assert kind in KINDS, kind

    def wrap(fn: Callable) -> Callable:
        if name in LOSSES:
            raise ValueError(f"loss '{name}' registered twice")
        is_module = isinstance(fn, type) and issubclass(fn, nn.Module)
        if is_module != trainable:
            raise ValueError(f"loss '{name}': trainable losses are nn.Module classes, plain ones functions")
        LOSSES[name] = LossSpec(name, kind, fn, trainable)
        return fn

    return wrap


def get_loss(name: str, kind: str, key: str = "loss") -> LossSpec:
    """The registered loss ``name``, which must be of ``kind``.

    Raises:
        AtmError: unknown name or wrong kind, naming the config ``key`` and the known losses of that kind.
    """
    spec = LOSSES.get(name)
    if spec is None or spec.kind != kind:
        known = ", ".join(n for n, s in LOSSES.items() if s.kind == kind)
        raise AtmError(f"{key}={name!r} is not a known {kind} loss (known: {known})")
    return spec


# ------------------------------------------------------------------------------------------ build_loss


class FunctionLoss(nn.Module):
    """A plain registered loss as a parameter-free module: ``forward(student, teacher, mask=None)`` calls
    ``fn(student, teacher, mask, **options)`` for the masked kinds (:data:`MASKED_KINDS`) and
    ``fn(student, teacher, **options)`` otherwise (the mask is ignored)."""

    def __init__(self, spec: LossSpec, **options: Any):
        super().__init__()
        self.spec = spec
        self.options = options

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.spec.kind in MASKED_KINDS:
            return self.spec.fn(student, teacher, mask, **self.options)
        return self.spec.fn(student, teacher, **self.options)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{self.spec.name}{opts}"


def _options_of(fn: Callable, skip: int) -> list[str]:
    """Keyword options of ``fn`` after its first ``skip`` positional parameters."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_loss(spec: LossSpec, d_s: int, d_t: int, **options: Any) -> nn.Module:
    """The loss ``spec`` as a module called ``module(student, teacher, mask=None) -> scalar``.

    Plain functions are wrapped in a parameter-free :class:`FunctionLoss` (``d_s``/``d_t`` unused; the
    objective projects the student first where the function needs equal widths); trainable losses are
    instantiated as ``spec.fn(d_s, d_t, **options)``.

    Args:
        spec: a registered loss (:func:`get_loss`).
        d_s, d_t: student and teacher widths of the tensors the module will receive.
        options: the loss's keyword options (e.g. ``critic_dim``, ``alpha``, ``temperature``).

    Raises:
        AtmError: an option the loss does not take, naming the loss and the options it takes.
    """
    if spec.trainable:
        known = _options_of(spec.fn.__init__, 3)  # self, d_s, d_t
    else:
        known = _options_of(spec.fn, 3 if spec.kind in MASKED_KINDS else 2)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise AtmError(f"loss {spec.name!r} has no option {', '.join(unknown)} "
                       f"(options: {', '.join(known) or 'none'})")
    if spec.trainable:
        return spec.fn(int(d_s), int(d_t), **options)
    return FunctionLoss(spec, **options)


# ------------------------------------------------------------------------------------- hard and logit


def _row_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of the float32 ``values[N]``; 0 (not NaN) when N = 0."""
    return values.float().sum() / max(values.numel(), 1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, per_item: int = 1) -> torch.Tensor:
    """``sum_{mask=1} values / (n * per_item)`` with ``n`` the number of ones in ``mask`` (counted in int64),
    ``values`` and ``mask`` of one shape; 0 when the mask is empty. Masked-out entries are dropped, not
    multiplied by 0, so an inf there cannot turn the result into NaN."""
    keep = mask.bool()
    total = torch.where(keep, values.float(), torch.zeros((), device=values.device)).sum()
    return total / (keep.sum() * per_item).clamp_min(1)


@register_loss("mlm_ce", "hard")
def mlm_ce(logits_s: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MLM cross-entropy: mean over positions with ``labels != -100`` of ``-log softmax(z_s)[label]``
    (Devlin et al. 2019); 0 when no position is labelled (a batch without masked token).

    Shapes: ``logits_s[..., V]``, ``labels[...]``.
    """
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits_s.reshape(-1, logits_s.shape[-1]).float(), labels, ignore_index=-100,
                            reduction="sum")
    return total / (labels != -100).sum().clamp_min(1)


@register_loss("soft_ce", "logit")
def soft_ce(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy against the teacher's distribution at temperature T:
    ``mean_n  - sum_c softmax(z_t / T)_c * log softmax(z_s / T)_c``
    (Hinton et al. 2015, eq. 1 with the cross-entropy; DistilBERT's L_ce, Sanh et al. 2019; AlexaTM sec. 3.3).
    Shapes ``[N, C]``; returns nats per position (0 for N = 0).
    """
    p_t = F.softmax(logits_t.float() / temperature, dim=-1)
    return _row_mean(-(p_t * F.log_softmax(logits_s.float() / temperature, dim=-1)).sum(-1))


@register_loss("kl", "logit")
def kl(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL divergence ``mean_n KL(softmax(z_t/T) || softmax(z_s/T))`` (Hinton et al. 2015; Distiller, He et
    al. 2021, sec. 3.1). Equals :func:`soft_ce` minus the teacher's entropy, so it has the same gradient in
    the student. Shapes ``[N, C]``; nats per position (0 for N = 0).
    """
    log_p_t = F.log_softmax(logits_t.float() / temperature, dim=-1)
    log_p_s = F.log_softmax(logits_s.float() / temperature, dim=-1)
    return _row_mean((log_p_t.exp() * (log_p_t - log_p_s)).sum(-1))


#: Logit losses that need every vocabulary entry of the teacher (no top-k teacher cache).
FULL_LOGIT_LOSSES = ("logit_mse", "logit_mse_over_t")


@register_loss("logit_mse", "logit")
def logit_mse(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean squared error between raw logits, ``mean_{n,c} (z_s - z_t)^2``: logit matching (Ba & Caruana
    2014; Kim et al. 2021, "Comparing Kullback-Leibler divergence and mean squared error loss in knowledge
    distillation", whose ``||z_s - z_t||_2^2`` sums over the C classes where this averages). ``temperature``
    is accepted and IGNORED: T^2 KL tends to logit matching as T -> inf (Hinton et al. 2015, sec. 2.1; Kim
    et al. 2021). For TextBrewer's convention, which divides the logits by T, use :func:`logit_mse_over_t`.
    Shapes ``[N, C]``; squared logit units; 0 for N = 0.
    """
    return _row_mean((logits_s.float() - logits_t.float()) ** 2)


@register_loss("logit_mse_over_t", "logit")
def logit_mse_over_t(logits_s: torch.Tensor, logits_t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean squared error between temperature-scaled logits, ``mean_{n,c} (z_s / T - z_t / T)^2
    = logit_mse / T^2`` (TextBrewer's ``kd_mse_loss``, Yang et al. 2020, ``textbrewer/losses.py``). With
    ``distill.logit.t_squared`` the factor T^2 cancels and the term equals :func:`logit_mse`. Shapes
    ``[N, C]``; 0 for N = 0.
    """
    return _row_mean(((logits_s.float() - logits_t.float()) / temperature) ** 2)


# ---------------------------------------------------------------------------------------------- hidden


@register_loss("hidden_mse", "hidden")
def hidden_mse(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden-state MSE over real tokens, ``sum_{b,t: mask=1} ||h_s W - h_t||^2 / (n_tokens * D)``
    (TinyBERT, Jiao et al. 2020, eq. 8; ``h_s`` is already projected by W). Shapes ``[B, T, D]``, ``mask[B, T]``.
    """
    return _masked_mean(((h_s.float() - h_t.float()) ** 2).sum(-1), mask, per_item=h_s.shape[-1])


@register_loss("hidden_cosine", "hidden")
def hidden_cosine(h_s: torch.Tensor, h_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cosine distance over real tokens, ``sum_{b,t: mask=1} (1 - cos(h_s[b,t], h_t[b,t])) / n_tokens``
    (DistilBERT's cosine embedding loss L_cos, Sanh et al. 2019, sec. 3; Distiller, He et al. 2021,
    sec. 3.2). Shapes ``[B, T, D]``, ``mask[B, T]``; in [0, 2]. A zero vector has cosine 0 (eps 1e-8).
    """
    cos = F.cosine_similarity(h_s.float(), h_t.float(), dim=-1, eps=1e-8)
    return _masked_mean(1.0 - cos, mask)


# ---------------------------------------------------------------------------------------------- pooled


def _check_pooled(z_s: torch.Tensor, z_t: torch.Tensor, name: str, same_width: bool) -> None:
    if z_s.ndim != 2 or z_t.ndim != 2 or z_s.shape[0] != z_t.shape[0]:
        raise AtmError(f"{name}: expects z_s[B, D_s] and z_t[B, D_t], got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    if same_width and z_s.shape[1] != z_t.shape[1]:
        raise AtmError(f"{name}: student width {z_s.shape[1]} != teacher width {z_t.shape[1]} "
                       f"(project the student first)")


@register_loss("pkd", "pooled")
def pkd(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Patient-KD loss (Sun et al. 2019, eq. 3):
    ``mean_b || z_s[b] / ||z_s[b]||_2  -  z_t[b] / ||z_t[b]||_2 ||_2^2``, squared distance of the
    L2-normalised [CLS] vectors summed over the width and averaged over the batch (the objective averages
    over the mapped layers). Shapes ``z_s[B, D]``, ``z_t[B, D]``; in [0, 4] (= 2 - 2 cos).
    """
    _check_pooled(z_s, z_t, "pkd", same_width=True)
    diff = F.normalize(z_s.float(), dim=-1) - F.normalize(z_t.float(), dim=-1)
    return (diff ** 2).sum(-1).mean()


def infonce_loss(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE loss of a critic matrix, ``-mean_i log softmax_j(S[i, :])[i]
    = mean_i (logsumexp_j S[i, j] - S[i, i])`` (positives on the diagonal).

    With ``S[i, j] = f(x_i, y_j)`` for B pairs ``(x_i, y_i) ~ p(x, y)``, ``I_NCE = log B - loss`` is a lower
    bound on I(X; Y) (van den Oord et al. 2018, eq. 4-5; Poole et al. 2019, eq. 12), i.e. ``-loss <= I - log B``
    in expectation, and ``loss >= 0`` so the bound never exceeds ``log B``. Float32 scalar.
    """
    s = scores.float()
    return (torch.logsumexp(s, dim=1) - s.diagonal()).mean()


def _loo_log_mean_exp(p: torch.Tensor) -> torch.Tensor:
    """Leave-one-out log-mean-exp along rows: ``out[j, k] = log (1/(K-1)) sum_{i != k} exp p[j, i]``
    for ``p[N, K]``, K >= 2, exact and O(N K) memory (no catastrophic cancellation: outside a row's argmax,
    the row sum minus one term is at least half the row sum; at the argmax, the rest is summed directly)."""
    k = p.shape[1]
    top = p.topk(2, dim=1)
    m1, m2 = top.values[:, :1], top.values[:, 1:2]
    is_max = torch.arange(k, device=p.device)[None, :] == top.indices[:, :1]
    e = torch.exp(p - m1)
    # k is not the row's argmax: the remaining sum contains exp(m1 - m1) = 1
    rest = (e.sum(1, keepdim=True) - e).clamp_min(torch.finfo(p.dtype).tiny)
    general = m1 + torch.log(rest)
    # k is the argmax: sum the others, scaled by the second largest
    others = torch.exp(p.masked_fill(is_max, float("-inf")) - m2).sum(1, keepdim=True)
    at_max = m2 + torch.log(others)
    return torch.where(is_max, at_max, general) - math.log(k - 1)


def interpolated_bound(scores: torch.Tensor, log_baseline: torch.Tensor, alpha: float) -> torch.Tensor:
    """The interpolated MI lower bound ``I_alpha`` of Poole et al. 2019 (ICML), sec. 2.4 "Interpolated
    bounds", eq. 11-12, on a batch critic matrix.

    Notation: x = student vector, y = teacher vector, ``scores[i, j] = f(x_i, y_j)`` (``[B, B]``, pairs
    ``(x_i, y_i)`` on the diagonal), ``log_baseline[j] = a(y_j) = log q(y_j)`` (``[B]``). The baseline of
    y interpolates the multi-sample (InfoNCE) baseline ``m(y; x_{1:K}) = (1/K) sum_k e^{f(x_k, y)}`` and the
    single-sample learned one::

        I_alpha = 1 + E_{p(x_{1:K}) p(y|x_1)} [ log e^{f(x_1, y)} / (alpha m(y; x_{1:K}) + (1-alpha) q(y)) ]
                    - E_{p(x_{1:K}) p(y)}     [ e^{f(x_1, y)} / (alpha m(y; x_{1:K}) + (1-alpha) q(y)) ]

    and ``I_alpha <= I(X; Y)`` for any critic and baseline. On the batch, as in the paper's implementation,
    the K = B - 1 samples are obtained by leaving one out: with ``m_{-k}(y_j) = (1/(B-1)) sum_{i != k}
    e^{f(x_i, y_j)}`` and ``d[j, k] = log(alpha m_{-k}(y_j) + (1-alpha) e^{a(y_j)})``::

        joint = mean_{j != k} ( f(x_j, y_j) - d[j, k] )       # y_j with its positive x_j among the K samples
        marg  = mean_{j != i} e^{ f(x_i, y_j) - d[j, j] }     # y_j independent of x_{-j}
        I_alpha = 1 + joint - marg

    all in log space (``logsumexp``/``logaddexp``). Special cases: ``alpha = 1`` makes ``marg = 1`` and
    ``I_1 = mean_{j != k} [ f(x_j, y_j) - log m_{-k}(y_j) ]``, InfoNCE with K = B - 1 samples normalised over
    the students for each teacher vector (<= log(B - 1)); ``alpha = 0`` is TUBA with baseline a,
    ``1 + mean_j (f_jj - a_j) - mean_{i != j} e^{f(x_i, y_j) - a_j}``, which is NWJ for ``a = 1``
    (Poole et al. eq. 8-9). Intermediate alpha trades InfoNCE's bias (``I_alpha <= log(K/alpha)``) for
    NWJ's variance.

    Returns a float32 scalar (the bound, in nats). Raises AtmError for B < 2 or alpha outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise AtmError(f"mi_alpha: alpha must be in [0, 1], got {alpha!r}")
    b = scores.shape[0]
    if scores.ndim != 2 or scores.shape[1] != b or b < 2:
        raise AtmError(f"mi_alpha: needs a square score matrix over at least 2 sequences, got {tuple(scores.shape)}")
    p = scores.float().T  # p[j, i] = f(x_i, y_j): one row per teacher vector y_j
    a = log_baseline.float().reshape(b, 1).expand(b, b)
    if alpha == 1.0:
        d = _loo_log_mean_exp(p)
    elif alpha == 0.0:
        d = a
    else:
        d = torch.logaddexp(math.log(alpha) + _loo_log_mean_exp(p), math.log1p(-alpha) + a)
    off = ~torch.eye(b, dtype=torch.bool, device=p.device)
    joint = (p.diagonal()[:, None] - d)[off].mean()
    marg = torch.exp(torch.logsumexp((p - d.diagonal()[:, None])[off], dim=0) - math.log(b * (b - 1)))
    return 1.0 + joint - marg


@register_loss("infonce", "pooled", trainable=True)
class InfoNCELoss(nn.Module):
    """Contrastive (InfoNCE) distillation of pooled vectors (van den Oord et al. 2018; CRD, Tian et al.
    2020; Distiller, He et al. 2021, sec. 3.3).

    A learned :class:`~atm.distill.critics.SeparableCritic` scores every student/teacher pair of the batch,
    ``S[i, j] = f(z_s_i, z_t_j) = g(z_s_i) . h(z_t_j) / tau``; the loss is
    ``-mean_i log softmax_j(S[i, :])[i]`` (:func:`infonce_loss`): each student vector must pick out its own
    sequence's teacher vector among the B teacher vectors of the batch. ``log B - loss`` is the InfoNCE
    lower bound on I(z_s; z_t), so minimising the loss maximises a bound on the mutual information;
    the loss is >= 0 and equals log B for an uninformative critic.

    Args:
        d_s, d_t: student and teacher widths (no projection needed).
        critic_dim: width of the critic's shared embedding space (default 128).
        hidden_dim: hidden width of the critic's MLPs; None (default) for linear embeddings.
        temperature: tau (default 1).
        normalize: L2-normalise the critic embeddings (cosine critic, CRD) (default False).

    Forward: ``(z_s[B, d_s], z_t[B, d_t], mask=None) -> scalar``; the mask is ignored.
    """

    def __init__(self, d_s: int, d_t: int, critic_dim: int = 128, hidden_dim: int | None = None,
                 temperature: float = 1.0, normalize: bool = False):
        super().__init__()
        self.critic = SeparableCritic(d_s, d_t, critic_dim, hidden_dim, temperature, normalize)

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_pooled(z_s, z_t, "infonce", same_width=False)
        return infonce_loss(self.critic(z_s, z_t))


@register_loss("mi_alpha", "pooled", trainable=True)
class InterpolatedMILoss(nn.Module):
    """Negative interpolated MI bound ``-I_alpha`` (Poole et al. 2019, sec. 2.4, eq. 11-12; the MI-alpha
    objective of Distiller, He et al. 2021, sec. 3.3) between student and teacher pooled vectors.

    A learned :class:`~atm.distill.critics.SeparableCritic` gives ``S[i, j] = f(z_s_i, z_t_j)`` and a learned
    :class:`~atm.distill.critics.Baseline` on the teacher side gives ``a(z_t_j) = log q(z_t_j)`` (starts at 0);
    the loss is ``-interpolated_bound(S, a, alpha)`` (see :func:`interpolated_bound` for the formula).
    ``alpha = 1`` is the leave-one-out InfoNCE bound (the baseline is then unused), ``alpha = 0`` the
    TUBA/NWJ bound with the learned baseline.

    Args:
        d_s, d_t: student and teacher widths.
        alpha: interpolation weight in [0, 1] (default 0.5).
        critic_dim, hidden_dim, temperature, normalize: of the critic, as for ``infonce``; ``hidden_dim``
            also shapes the baseline network.

    Forward: ``(z_s[B, d_s], z_t[B, d_t], mask=None) -> scalar`` (B >= 2); the mask is ignored.
    """

    def __init__(self, d_s: int, d_t: int, alpha: float = 0.5, critic_dim: int = 128,
                 hidden_dim: int | None = None, temperature: float = 1.0, normalize: bool = False):
        super().__init__()
        if not 0.0 <= float(alpha) <= 1.0:
            raise AtmError(f"mi_alpha: alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.critic = SeparableCritic(d_s, d_t, critic_dim, hidden_dim, temperature, normalize)
        self.baseline = Baseline(d_t, hidden_dim)

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        _check_pooled(z_s, z_t, "mi_alpha", same_width=False)
        return -interpolated_bound(self.critic(z_s, z_t), self.baseline(z_t), self.alpha)


# ------------------------------------------------------------------------------------------- attention


def _check_attention(a_s: torch.Tensor, a_t: torch.Tensor, name: str) -> None:
    if a_s.ndim != 4 or a_t.ndim != 4:
        raise AtmError(f"{name}: expects attention scores [B, H, T, T], got {tuple(a_s.shape)} and {tuple(a_t.shape)}")
    if a_s.shape[1] != a_t.shape[1]:
        raise AtmError(f"{name}: the student has {a_s.shape[1]} attention heads and the teacher {a_t.shape[1]}; "
                       f"merge the teacher's heads first (merge_heads)")
    if a_s.shape != a_t.shape:
        raise AtmError(f"{name}: student and teacher attention shapes differ: {tuple(a_s.shape)} vs {tuple(a_t.shape)}")


def merge_heads(a: torch.Tensor, n_heads_out: int) -> torch.Tensor:
    """Average consecutive groups of heads: ``a[B, H, T, T] -> [B, n_heads_out, T, T]`` with output head
    ``h`` the mean of input heads ``h*g .. h*g + g - 1``, ``g = H / n_heads_out``.

    Used to compare a teacher with more heads to a student. Divides before summing, so that the additive
    mask's -3.4e38 entries of pre-softmax scores stay finite. Raises AtmError unless H is divisible by
    ``n_heads_out``.
    """
    if a.ndim != 4:
        raise AtmError(f"merge_heads: expects [B, H, T, T], got {tuple(a.shape)}")
    b, h, t, t2 = a.shape
    if n_heads_out < 1 or h % n_heads_out:
        raise AtmError(f"merge_heads: {h} attention heads cannot be merged into {n_heads_out} "
                       f"({h} is not a multiple of {n_heads_out})")
    g = h // n_heads_out
    return (a.reshape(b, n_heads_out, g, t, t2) / g).sum(2)


@register_loss("attention_mse", "attention")
def attention_mse(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """TinyBERT's attention loss (Jiao et al. 2020, eq. 7), ``(1/h) sum_heads MSE(A_s, A_t)`` on the
    pre-softmax attention scores, over real query/key pairs only:
    ``sum_{b,h,q,k: mask[b,q] = mask[b,k] = 1} (a_s - a_t)^2 / (H * sum_b n_b^2)``.

    Entries of padded queries or keys are zeroed (explicitly from ``mask``; TinyBERT's code zeroes scores
    <= -1e2, which is what this does when ``mask`` is None, then averaging over all B*H*T*T entries).
    Shapes ``[B, H, T, T]``, ``mask[B, T]``. Raises AtmError for different head counts.
    """
    _check_attention(a_s, a_t, "attention_mse")
    s, t = a_s.float(), a_t.float()
    if mask is None:
        zero = torch.zeros((), device=s.device)
        s, t = torch.where(s <= -1e2, zero, s), torch.where(t <= -1e2, zero, t)
        return ((s - t) ** 2).mean()
    m = mask.bool()
    pair = m[:, :, None] & m[:, None, :]  # [B, T, T]
    zero = torch.zeros((), device=s.device)
    keep = pair[:, None]
    sq = (torch.where(keep, s, zero) - torch.where(keep, t, zero)) ** 2  # masked scores are -3.4e38
    return _masked_mean(sq.sum(1), pair, per_item=a_s.shape[1])


@register_loss("attention_kl", "attention")
def attention_kl(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MiniLM's self-attention distribution transfer (Wang et al. 2020, eq. 3-4): the KL divergence
    ``KL(A_t[b,h,q,:] || A_s[b,h,q,:])`` between the teacher's and the student's attention distributions,
    averaged over heads and real query positions:
    ``sum_{b,h,q: mask[b,q]=1} sum_{k: mask[b,k]=1} p_t (log p_t - log p_s) / (H * n_tokens)``.

    Takes pre-softmax SCORES (like :func:`attention_mse`) and applies a masked softmax over the real keys
    itself (padded keys get probability 0; any additive mask already in the scores is overridden).
    Shapes ``[B, H, T, T]``, ``mask[B, T]`` (None: every position is real). Nats per (head, token).
    Raises AtmError for different head counts.
    """
    _check_attention(a_s, a_t, "attention_kl")
    b, h, t, _ = a_s.shape
    m = torch.ones(b, t, dtype=torch.bool, device=a_s.device) if mask is None else mask.bool()
    keys = m[:, None, None, :]  # [B, 1, 1, T]
    low = torch.finfo(torch.float32).min
    log_p_s = F.log_softmax(a_s.float().masked_fill(~keys, low), dim=-1)
    log_p_t = F.log_softmax(a_t.float().masked_fill(~keys, low), dim=-1)
    terms = torch.where(keys, log_p_t.exp() * (log_p_t - log_p_s), torch.zeros((), device=a_s.device))
    per_query = terms.sum(-1)  # [B, H, T]
    return _masked_mean(per_query.sum(1), m, per_item=h)
