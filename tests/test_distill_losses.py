"""Golden values for the logit-MSE conventions and the hidden, pooled and attention distillation losses,
the critics, ``build_loss`` and the pre-softmax attention scores of :mod:`atm.models.attention`; bf16 token
counts and empty selections.

References are computed by hand (arithmetic in the comments) or by plain-Python loops written
independently of the vectorised implementations.
"""

import math

import pytest
import torch
from torch import nn

from atm.distill.losses import (
    LOSSES,
    FunctionLoss,
    InfoNCELoss,
    InterpolatedMILoss,
    _loo_log_mean_exp,
    build_loss,
    get_loss,
    infonce_loss,
    interpolated_bound,
    merge_heads,
)
from atm.errors import AtmError


def _close(a, b, tol=1e-5):
    return a == pytest.approx(b, abs=tol, rel=tol)


# ---------------------------------------------------------------------------------------------- registry


def test_registry_kinds_and_trainable_flags():
    expected = {"hidden_cosine": ("hidden", False), "pkd": ("pooled", False), "infonce": ("pooled", True),
                "mi_alpha": ("pooled", True), "attention_mse": ("attention", False),
                "attention_kl": ("attention", False), "hidden_mse": ("hidden", False), "kl": ("logit", False)}
    for name, (kind, trainable) in expected.items():
        spec = get_loss(name, kind)
        assert (spec.kind, spec.trainable) == (kind, trainable)
    with pytest.raises(AtmError, match=r"known: .*pkd.*infonce.*mi_alpha"):
        get_loss("nope", "pooled", "distill.pooled.loss")


# ----------------------------------------------------------------------------------------------- logit

LOGITS_S = torch.tensor([[0.0, math.log(3.0)], [1.0, -1.0]])
LOGITS_T = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
SQUARED = math.log(3.0) ** 2 + 4.0  # sum of the squared logit differences: ln 3 and -2


def test_logit_mse_conventions_golden():
    # raw logits (Ba & Caruana 2014; Kim et al. 2021): mean over the 4 entries, whatever T
    for t in (1.0, 2.0, 4.0):
        assert _close(LOSSES["logit_mse"].fn(LOGITS_S, LOGITS_T, temperature=t).item(), SQUARED / 4)
    # TextBrewer's kd_mse_loss: logits divided by T first, = SQUARED / (4 T^2)
    assert _close(LOSSES["logit_mse_over_t"].fn(LOGITS_S, LOGITS_T, temperature=1.0).item(), SQUARED / 4)
    assert _close(LOSSES["logit_mse_over_t"].fn(LOGITS_S, LOGITS_T, temperature=2.0).item(), SQUARED / 16)
    g = torch.Generator().manual_seed(0)
    zs, zt = 3 * torch.randn(5, 7, generator=g), 3 * torch.randn(5, 7, generator=g)
    textbrewer = torch.nn.functional.mse_loss(zs / 3.0, zt / 3.0)
    assert _close(LOSSES["logit_mse_over_t"].fn(zs, zt, 3.0).item(), textbrewer.item())
    # with t_squared the T^2 cancels: T^2 * over_t == logit_mse
    assert _close(9.0 * LOSSES["logit_mse_over_t"].fn(zs, zt, 3.0).item(), LOSSES["logit_mse"].fn(zs, zt, 3.0).item())
    # the convention is chosen by name; a misspelt one is a one-line error naming the key and both conventions
    with pytest.raises(AtmError, match=r"^distill.logit.loss='logit_mse_t' is not .*logit_mse, logit_mse_over_t"):
        get_loss("logit_mse_t", "logit", "distill.logit.loss")


@pytest.mark.parametrize("name", ["soft_ce", "kl", "logit_mse", "logit_mse_over_t"])
def test_logit_losses_of_no_position_are_zero(name):
    """A batch without masked token selects no logit row: the loss is 0 with a zero gradient, not NaN."""
    z_s = torch.zeros(0, 5, requires_grad=True)
    value = LOSSES[name].fn(z_s, torch.zeros(0, 5), temperature=2.0)
    value.backward()
    assert value.item() == 0.0 and torch.equal(z_s.grad, torch.zeros(0, 5))


def test_mlm_ce_without_masked_token_is_zero():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    value = LOSSES["mlm_ce"].fn(logits, torch.full((2, 3), -100))
    value.backward()
    assert value.item() == 0.0 and torch.equal(logits.grad, torch.zeros(2, 3, 5))
    assert LOSSES["mlm_ce"].fn(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).item() == 0.0


# ---------------------------------------------------------------------------------------------- hidden


def test_hidden_losses_count_bf16_tokens_exactly():
    """2,251 real tokens: a bf16 count rounds to 2,256, so counting in the input dtype would give 2251/2256."""
    assert torch.ones(2251, dtype=torch.bfloat16).sum().item() == 2256  # the rounding this test guards against
    mask = torch.zeros(2, 1200, dtype=torch.long)
    mask[0], mask[1, :1051] = 1, 1  # 1,200 + 1,051 = 2,251 real tokens
    # real tokens: h_s = (1, 0), h_t = (0, 1): squared distance 2 over D = 2, cosine 0; padding: opposite and
    # large (would add 80,000 per token to the MSE and 2 to the cosine distance)
    h_s = torch.tensor([1.0, 0.0]).expand(2, 1200, 2).clone()
    h_t = torch.tensor([0.0, 1.0]).expand(2, 1200, 2).clone()
    h_s[mask == 0], h_t[mask == 0] = 100.0, -100.0
    h_s, h_t = h_s.to(torch.bfloat16), h_t.to(torch.bfloat16)
    assert LOSSES["hidden_mse"].fn(h_s, h_t, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert LOSSES["hidden_cosine"].fn(h_s, h_t, mask).item() == pytest.approx(1.0, rel=1e-6)
    assert LOSSES["hidden_mse"].fn(h_s, h_t, mask.to(torch.bfloat16)).item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("name", ["hidden_mse", "hidden_cosine", "attention_mse", "attention_kl"])
def test_masked_losses_of_no_real_token_are_zero(name):
    shape = (2, 2, 3, 3) if name.startswith("attention") else (2, 3, 4)
    x = torch.randn(*shape, requires_grad=True)
    value = LOSSES[name].fn(x, torch.randn(*shape), torch.zeros(2, 3, dtype=torch.long))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(x.grad).all()


def test_hidden_cosine_golden_ignores_padding():
    h_s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    h_t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: cos((1,0),(0,1)) = 0 -> 1; token 1: cos = 1 -> 0; token 2 padded (would be 1 - 1/sqrt 2)
    assert _close(LOSSES["hidden_cosine"].fn(h_s, h_t, mask).item(), 0.5)
    # all tokens: (1 + 0 + (1 - 1/sqrt 2)) / 3
    assert _close(LOSSES["hidden_cosine"].fn(h_s, h_t, torch.ones(1, 3)).item(), (2 - 1 / math.sqrt(2)) / 3)


# ---------------------------------------------------------------------------------------------- pooled


def test_pkd_golden():
    z_s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    z_t = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    # row 0: (0.6, 0.8) - (0.8, 0.6) = (-0.2, 0.2) -> 0.08; row 1: (1, 0) - (0, 1) -> 2; mean 1.04
    assert _close(LOSSES["pkd"].fn(z_s, z_t).item(), 1.04)
    assert _close(LOSSES["pkd"].fn(10 * z_s, 0.1 * z_t).item(), 1.04)  # scale-invariant
    with pytest.raises(AtmError, match="width 3 != teacher width 2"):
        LOSSES["pkd"].fn(torch.ones(2, 3), z_t)


def _identity_critic(module, d):
    """Critic embeddings set to the identity, so that S = z_s z_t^T / tau."""
    for lin in (module.critic.g, module.critic.h):
        assert isinstance(lin, nn.Linear) and lin.weight.shape == (d, d)
        with torch.no_grad():
            lin.weight.copy_(torch.eye(d))
            lin.bias.zero_()


Z_S = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]])
Z_T = torch.tensor([[0.5, 0.0], [0.2, 1.0], [1.0, -1.0], [0.0, 0.3]])


def _scores(z_s, z_t, tau):
    b = len(z_s)
    return [[sum(z_s[i][d] * z_t[j][d] for d in range(len(z_s[0]))) / tau for j in range(b)] for i in range(b)]


def test_infonce_identity_critic_matches_loop():
    tau = 0.5
    loss_mod = build_loss(get_loss("infonce", "pooled"), 2, 2, critic_dim=2, temperature=tau)
    _identity_critic(loss_mod, 2)
    s = _scores(Z_S.tolist(), Z_T.tolist(), tau)
    b = len(s)
    # -mean_i log( e^{S_ii} / sum_j e^{S_ij} )
    ref = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(b))) for i in range(b)) / b
    assert _close(loss_mod(Z_S, Z_T).item(), ref)
    # uninformative critic (all scores equal): loss = log B; aligned positives: below log B
    assert _close(loss_mod(torch.zeros(4, 2), Z_T).item(), math.log(4))
    aligned = 3 * torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    value = loss_mod(aligned, aligned).item()
    assert 0 <= value < math.log(4) - 1  # S_ii = 18, S_ij <= 0: loss ~ 2 e^-18


def _loo_reference(p, j, k):
    """log (1/(K-1)) sum_{i != k} exp p[j][i]."""
    vals = [p[j][i] for i in range(len(p[j])) if i != k]
    return math.log(sum(math.exp(v) for v in vals) / len(vals))


def test_leave_one_out_log_mean_exp_is_exact_and_stable():
    p = torch.tensor([[100.0, 0.0, -100.0], [1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [0.0, 60.0, 59.0]],
                     dtype=torch.float64)
    out = _loo_log_mean_exp(p)
    rows = p.tolist()
    for j in range(4):
        for k in range(3):
            kept = [rows[j][i] for i in range(3) if i != k]
            top = max(kept)  # factor out the largest kept value: top + log mean exp(v - top)
            ref = top + math.log(sum(math.exp(v - top) for v in kept) / len(kept))
            assert out[j, k].item() == pytest.approx(ref, abs=1e-9)
    assert _close(_loo_log_mean_exp(p.float())[3, 1].item(), 59 + math.log(1 + math.exp(-59)) - math.log(2))
    # the log-sum-exp trick row (100, 0, -100): leaving out 100 gives log((1 + e^-100)/2) ~ -log 2
    assert out[0, 0].item() == pytest.approx(math.log(0.5), abs=1e-9)


def _interpolated_reference(s, a, alpha):
    """I_alpha by loops: s[i][j] = f(x_i, y_j) (x student, y teacher), a[j] = log q(y_j)."""
    b = len(s)

    def d(j, k):  # log(alpha m_{-k}(y_j) + (1 - alpha) q(y_j)), m over the students i != k
        m = sum(math.exp(s[i][j]) for i in range(b) if i != k) / (b - 1)
        return math.log(alpha * m + (1 - alpha) * math.exp(a[j]))

    pairs = [(j, k) for j in range(b) for k in range(b) if j != k]
    joint = sum(s[j][j] - d(j, k) for j, k in pairs) / len(pairs)
    marg = sum(math.exp(s[i][j] - d(j, j)) for j, i in pairs) / len(pairs)
    return 1 + joint - marg


def test_mi_alpha_identity_critic_matches_loops_and_special_cases():
    tau = 0.5
    s = _scores(Z_S.tolist(), Z_T.tolist(), tau)
    b = len(s)
    zero = [0.0] * b
    mod = build_loss(get_loss("mi_alpha", "pooled"), 2, 2, critic_dim=2, temperature=tau)
    _identity_critic(mod, 2)
    assert isinstance(mod, InterpolatedMILoss)
    # the baseline starts at a = 0
    assert torch.equal(mod.baseline(Z_T), torch.zeros(b))
    for alpha in (0.0, 0.3, 0.5, 1.0):
        mod.alpha = alpha
        assert _close(-mod(Z_S, Z_T).item(), _interpolated_reference(s, zero, alpha)), alpha

    # alpha = 1: leave-one-out InfoNCE with K = B - 1 samples, normalised over the students of each teacher
    # vector y_j:  mean_{j != k} [ S_jj - log (1/(B-1)) sum_{i != k} e^{S_ij} ]  <= log(B - 1)
    nce = sum(s[j][j] - _loo_reference([[s[i][j] for i in range(b)] for j in range(b)], j, k)
              for j in range(b) for k in range(b) if j != k) / (b * (b - 1))
    mod.alpha = 1.0
    assert _close(-mod(Z_S, Z_T).item(), nce)
    # Poole's relation: I_1 is the InfoNCE bound log K - infonce_loss with K = B - 1 pairs, normalised over
    # the students (scores transposed), averaged over the pair k left out of the batch
    full = torch.tensor(s)
    keep = [[i for i in range(b) if i != k] for k in range(b)]
    loo_nce = sum(math.log(b - 1) - infonce_loss(full[idx][:, idx].T).item() for idx in keep) / b
    assert _close(-mod(Z_S, Z_T).item(), loo_nce)
    assert -mod(Z_S, Z_T).item() <= math.log(b - 1)
    # B = 2: K = 1, one candidate -> the bound is exactly 0
    assert _close(-mod(Z_S[:2], Z_T[:2]).item(), 0.0)

    # alpha = 0 with a = 0: TUBA  1 + mean_j S_jj - mean_{i != j} e^{S_ij}  = NWJ with critic S + 1
    def nwj(f):  # NWJ (Nguyen et al. 2010; Poole eq. 9): E_p[f] - e^{-1} E_{p(x)p(y)}[e^f]
        joint = sum(f[j][j] for j in range(b)) / b
        marg = sum(math.exp(f[i][j]) for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return joint - math.exp(-1) * marg

    mod.alpha = 0.0
    assert _close(-mod(Z_S, Z_T).item(), nwj([[v + 1 for v in row] for row in s]))
    # with the baseline a = 1 it is NWJ itself
    with torch.no_grad():
        mod.baseline.net.bias.fill_(1.0)
    assert _close(-mod(Z_S, Z_T).item(), nwj(s))


def test_mi_alpha_gradients_reach_critic_and_baseline():
    torch.manual_seed(0)
    mod = build_loss(get_loss("mi_alpha", "pooled"), 6, 10, critic_dim=4, hidden_dim=8, alpha=0.5)
    z_s = torch.randn(5, 6, requires_grad=True)
    z_t = torch.randn(5, 10)
    loss = mod(z_s, z_t)
    loss.backward()
    assert torch.isfinite(loss)
    named = dict(mod.named_parameters())
    assert set(named) >= {"critic.g.0.weight", "critic.h.2.weight", "baseline.net.2.weight"}
    for name in ("critic.g.0.weight", "critic.h.0.weight", "critic.g.2.weight", "baseline.net.2.weight"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    assert z_s.grad.abs().sum() > 0
    # a few optimiser steps on an easy pair raise the bound
    z_s, z_t = torch.randn(16, 6), None
    z_t = torch.cat([z_s, z_s[:, :4]], 1)
    opt = torch.optim.Adam(mod.parameters(), lr=0.05)
    first = mod(z_s, z_t).item()
    for _ in range(30):
        opt.zero_grad()
        loss = mod(z_s, z_t)
        loss.backward()
        opt.step()
    assert mod(z_s, z_t).item() < first


def test_interpolated_bound_errors():
    with pytest.raises(AtmError, match="alpha must be in"):
        build_loss(get_loss("mi_alpha", "pooled"), 4, 4, alpha=1.5)
    with pytest.raises(AtmError, match="at least 2"):
        interpolated_bound(torch.zeros(1, 1), torch.zeros(1), 0.5)


# ------------------------------------------------------------------------------------------- attention


def test_attention_mse_golden_with_masking():
    # B=1, H=2, T=2; only (query 0, key 0) is real
    a_s = torch.tensor([[[[1.0, -1e4], [7.0, 9.0]], [[2.0, -3e38], [0.0, 5.0]]]])
    a_t = torch.tensor([[[[3.0, -1e4], [0.0, 1.0]], [[2.0, -3e38], [4.0, 5.0]]]])
    mask = torch.tensor([[1, 0]])
    # head 0: (1 - 3)^2 = 4; head 1: 0; divided by H * n_real_pairs = 2 * 1
    assert _close(LOSSES["attention_mse"].fn(a_s, a_t, mask).item(), 2.0)
    # no mask: TinyBERT zeroes scores <= -1e2, mean over all 8 entries:
    # head 0: 4 + 0 + 49 + 64 = 117; head 1: 0 + 0 + 16 + 0 = 16 -> 133 / 8
    assert _close(LOSSES["attention_mse"].fn(a_s, a_t, None).item(), 133 / 8)


def test_attention_mse_matches_loop():
    g = torch.Generator().manual_seed(0)
    a_s, a_t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    total, n = 0.0, 0
    for b in range(2):
        for h in range(3):
            for q in range(4):
                for k in range(4):
                    if mask[b, q] and mask[b, k]:
                        total += (a_s[b, h, q, k].item() - a_t[b, h, q, k].item()) ** 2
                        n += 1
    assert n == 3 * (9 + 4)
    assert _close(LOSSES["attention_mse"].fn(a_s, a_t, mask).item(), total / n)


def test_attention_kl_golden_and_loop():
    # one head, 3 positions, the last one padded; query 0: teacher (0, 0) -> (1/2, 1/2),
    # student (0, ln 3) -> (1/4, 3/4): KL = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3);
    # query 1: identical rows -> 0; query 2 padded. Mean over the 2 real queries.
    big = 50.0  # scores of the padded key would dominate if not masked
    a_t = torch.tensor([[[[0.0, 0.0, big], [1.0, 2.0, big], [3.0, 0.0, 1.0]]]])
    a_s = torch.tensor([[[[0.0, math.log(3.0), -big], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    expected = (0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2
    assert _close(LOSSES["attention_kl"].fn(a_s, a_t, mask).item(), expected)

    g = torch.Generator().manual_seed(1)
    a_s, a_t = 3 * torch.randn(2, 2, 4, 4, generator=g), 3 * torch.randn(2, 2, 4, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    total, n = 0.0, 0
    for b in range(2):
        keys = [k for k in range(4) if mask[b, k]]
        for h in range(2):
            for q in keys:  # real queries
                zt = [math.exp(a_t[b, h, q, k].item()) for k in keys]
                zs = [math.exp(a_s[b, h, q, k].item()) for k in keys]
                pt = [v / sum(zt) for v in zt]
                ps = [v / sum(zs) for v in zs]
                total += sum(p * math.log(p / r) for p, r in zip(pt, ps))
                n += 1
    assert _close(LOSSES["attention_kl"].fn(a_s, a_t, mask).item(), total / n)
    assert LOSSES["attention_kl"].fn(a_t, a_t, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_head_mismatch_and_merge_heads():
    mask = torch.ones(1, 3)
    for name in ("attention_mse", "attention_kl"):
        with pytest.raises(AtmError, match=r"student has 2 attention heads and the teacher 4"):
            LOSSES[name].fn(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3), mask)
    a = torch.arange(4.0).reshape(1, 4, 1, 1).expand(1, 4, 2, 2)  # head h holds the value h
    merged = merge_heads(a, 2)
    assert merged.shape == (1, 2, 2, 2)
    assert torch.equal(merged[0, :, 0, 0], torch.tensor([0.5, 2.5]))  # (0+1)/2, (2+3)/2
    assert torch.equal(merge_heads(a, 1)[0, 0], torch.full((2, 2), 1.5))
    assert torch.equal(merge_heads(a, 4), a)
    assert torch.isfinite(merge_heads(torch.full((1, 4, 1, 1), torch.finfo(torch.float32).min), 1)).all()
    with pytest.raises(AtmError, match="4 attention heads cannot be merged into 3"):
        merge_heads(a, 3)
    # merged teacher heads then compare with a 2-head student
    assert LOSSES["attention_mse"].fn(torch.zeros(1, 2, 2, 2), merged, torch.ones(1, 2)).item() == pytest.approx(
        (0.5 ** 2 + 2.5 ** 2) / 2)


# ------------------------------------------------------------------------------------------ build_loss


def test_build_loss_plain_and_trainable():
    h_s, h_t, mask = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 0, 0]])
    mod = build_loss(get_loss("hidden_cosine", "hidden"), 4, 4)
    assert isinstance(mod, FunctionLoss) and not list(mod.parameters())
    assert mod(h_s, h_t, mask).item() == LOSSES["hidden_cosine"].fn(h_s, h_t, mask).item()
    pk = build_loss(get_loss("pkd", "pooled"), 4, 4)
    assert pk(h_s[:, 0], h_t[:, 0]).item() == LOSSES["pkd"].fn(h_s[:, 0], h_t[:, 0]).item()
    soft = build_loss(get_loss("soft_ce", "logit"), 4, 4, temperature=2.0)
    assert soft(h_s[0], h_t[0]).item() == LOSSES["soft_ce"].fn(h_s[0], h_t[0], 2.0).item()
    with pytest.raises(AtmError, match=r"'hidden_cosine' has no option temperature \(options: none\)"):
        build_loss(get_loss("hidden_cosine", "hidden"), 4, 4, temperature=2.0)

    nce = build_loss(get_loss("infonce", "pooled"), 6, 10, critic_dim=4)
    assert isinstance(nce, InfoNCELoss)
    assert (nce.critic.g.in_features, nce.critic.h.in_features, nce.critic.g.out_features) == (6, 10, 4)
    value = nce(torch.randn(5, 6), torch.randn(5, 10), None)
    assert value.shape == () and torch.isfinite(value)
    assert sum(p.numel() for p in nce.parameters()) == (6 * 4 + 4) + (10 * 4 + 4)
    with pytest.raises(AtmError, match=r"'infonce' has no option alpha \(options: critic_dim, hidden_dim"):
        build_loss(get_loss("infonce", "pooled"), 6, 10, alpha=0.5)


# --------------------------------------------------------------------------------- attention scores


def _tiny_mlm(impl):
    from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM

    cfg = RobertaPreLayerNormConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=32, max_position_embeddings=20, type_vocab_size=1,
                                    attn_implementation=impl)
    torch.manual_seed(0)
    return RobertaPreLayerNormForMaskedLM(cfg).eval()


def test_attention_scores_match_eager_and_sdpa():
    from atm.models.attention import (
        SCORES_IMPLEMENTATION,
        attention_scores_mode,
        set_attention_scores,
        uses_attention_scores,
    )
    from atm.models.encoder import mlm_forward

    model = _tiny_mlm("eager")
    ids = torch.randint(3, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    ids[1, 4:] = 1  # <pad>
    with torch.no_grad():
        eager = mlm_forward(model, ids, mask, output_hidden_states=True, output_attentions=True)
        set_attention_scores(model, True)
        assert uses_attention_scores(model) and model.config._attn_implementation == SCORES_IMPLEMENTATION
        scored = mlm_forward(model, ids, mask, output_hidden_states=True, output_attentions=True)
        set_attention_scores(model, False)
        assert model.config._attn_implementation == "eager"
        model.set_attn_implementation("sdpa")
        sdpa = mlm_forward(model, ids, mask)
        with attention_scores_mode(model):
            nopad = mlm_forward(model, ids[:1], mask[:1], output_attentions=True)
        assert model.config._attn_implementation == "sdpa"
        model.set_attn_implementation("eager")
        ref_nopad = mlm_forward(model, ids[:1], mask[:1], output_attentions=True)

    assert torch.allclose(scored["logits"], eager["logits"], atol=1e-5)
    assert torch.allclose(scored["logits"], sdpa["logits"], atol=1e-5)
    for hs, he in zip(scored["hidden_states"], eager["hidden_states"]):
        assert torch.allclose(hs, he, atol=1e-5)
    assert len(scored["attentions"]) == 2
    for sc, pr in zip(scored["attentions"], eager["attentions"]):
        assert sc.shape == pr.shape == (2, 2, 6, 6)
        assert torch.allclose(torch.softmax(sc, -1), pr, atol=1e-6)
        assert (sc[1, :, :, 4:] < -1e30).all()  # padded keys carry the additive mask
        assert torch.isfinite(sc[:, :, :, :4]).all() and sc[0].abs().max() < 1e3
        # the attention losses consume them: identical scores give zero
        assert LOSSES["attention_kl"].fn(sc, sc, mask).item() == pytest.approx(0.0, abs=1e-7)
        assert LOSSES["attention_mse"].fn(sc, sc, mask).item() == 0.0
    for sc, pr in zip(nopad["attentions"], ref_nopad["attentions"]):  # no padding: no mask at all
        assert torch.isfinite(sc).all() and torch.allclose(torch.softmax(sc, -1), pr, atol=1e-6)


def test_attention_scores_are_differentiable():
    from atm.models.attention import set_attention_scores
    from atm.models.encoder import mlm_forward

    student, teacher = _tiny_mlm("sdpa"), _tiny_mlm("eager")
    set_attention_scores(student, True)
    set_attention_scores(teacher, True)
    ids = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        a_t = mlm_forward(teacher, ids, mask, output_attentions=True)["attentions"]
    with torch.no_grad():  # make the student differ from the teacher
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    a_s = mlm_forward(student, ids, mask, output_attentions=True)["attentions"]
    loss = sum(LOSSES["attention_kl"].fn(s, t, mask) + LOSSES["attention_mse"].fn(s, t, mask)
               for s, t in zip(a_s, a_t))
    loss.backward()
    grad = student.roberta_prelayernorm.encoder.layer[0].attention.self.query.weight.grad
    assert torch.isfinite(loss) and loss.item() > 0
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
