"""Distillation data augmentation (atm/distill/augment.py): rates, untouched positions, teacher top-k,
determinism, mixup embeddings, repeated copies, config validation and the conf/augment presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from atm.distill import augment as A
from atm.errors import AtmError
from atm.models.encoder import mlm_forward

CONF = Path(__file__).resolve().parents[1] / "conf" / "augment"
N_WORDS = 200
BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
SPECIAL = torch.tensor([BOS, PAD, EOS, UNK, MASK])
TOKEN_LEVEL = ["random_replace", "mask", "contextual"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import XLMRobertaTokenizer

    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    tok = XLMRobertaTokenizer(vocab=vocab + [(f"▁w{i}", -1.0) for i in range(N_WORDS)])
    assert len(tok) == N_WORDS + 5
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (
        BOS, PAD, EOS, UNK, MASK)
    return tok


def tiny_mlm(tokenizer, hidden: int = 16, seed: int = 0):
    from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM

    config = RobertaPreLayerNormConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=2 * hidden,
                                       max_position_embeddings=80, pad_token_id=PAD, bos_token_id=BOS,
                                       eos_token_id=EOS, type_vocab_size=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RobertaPreLayerNormForMaskedLM(config).eval()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return tiny_mlm(tokenizer)


def make_batch(b: int = 64, t: int = 48, seed: int = 0, mlm_rate: float = 0.15) -> dict[str, torch.Tensor]:
    """Right-padded MLM batch: <s> w.. </s> <pad>..; some <unk> inside; ``mlm_rate`` of the words are MLM
    targets (input <mask>, label = original id)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((b, t), PAD, dtype=torch.long)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        n = int(torch.randint(t // 2, t + 1, (1,), generator=g))
        ids[i, 0], ids[i, n - 1] = BOS, EOS
        ids[i, 1:n - 1] = torch.randint(5, 5 + N_WORDS, (n - 2,), generator=g)
        mask[i, :n] = 1
    words = mask.bool() & (ids >= 5)
    unk = words & (torch.rand(b, t, generator=g) < 0.03)
    ids[unk] = UNK
    targets = words & ~unk & (torch.rand(b, t, generator=g) < mlm_rate)
    labels = torch.full((b, t), -100, dtype=torch.long)
    labels[targets] = ids[targets]
    ids[targets] = MASK
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eligible(batch):
    return batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], SPECIAL) & (batch["labels"] == -100)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(name, tokenizer, teacher, **options):
    return A.build_augmentation(OmegaConf.create({"name": name, **options}), tokenizer=tokenizer, teacher=teacher)


def teacher_topk(teacher, batch, out, k):
    """Recompute the contextual candidates: mask the changed positions, run the teacher, ban specials and the
    original token, take the top k."""
    changed = out["input_ids"] != batch["input_ids"]
    masked = batch["input_ids"].masked_fill(changed, MASK)
    with torch.no_grad():
        logits = mlm_forward(teacher, masked, batch["attention_mask"], changed)["logits"]
    logits[:, SPECIAL] = float("-inf")
    logits[torch.arange(len(logits)), batch["input_ids"][changed]] = float("-inf")
    return changed, logits, logits.topk(k, dim=1).indices


# ------------------------------------------------------------------------------------ token-level methods


@pytest.mark.parametrize("name", TOKEN_LEVEL)
def test_token_level_rate_and_untouched_positions(name, tokenizer, teacher):
    p = 0.3
    batch = make_batch()
    before = {k: v.clone() for k, v in batch.items()}
    aug = build(name, tokenizer, teacher, probability=p, seed=1)
    out = aug(batch, gen(0))
    assert all(torch.equal(batch[k], before[k]) for k in batch), "the input batch was modified"
    assert set(out) == set(batch)
    assert torch.equal(out["labels"], batch["labels"]) and torch.equal(out["attention_mask"], batch["attention_mask"])
    ok = eligible(batch)
    changed = out["input_ids"] != batch["input_ids"]
    assert not (changed & ~ok).any(), "special tokens, padding or MLM targets were changed"
    measured = float(changed.sum()) / float(ok.sum())
    assert aug.last_rate == pytest.approx(measured)
    assert aug.last_metrics == {"augment/rate": aug.last_rate}
    expected = p * (1 - 1 / N_WORDS) if name == "random_replace" else p
    assert measured == pytest.approx(expected, abs=0.04), (ok.sum(), measured)
    new = out["input_ids"][changed]
    if name == "mask":
        assert (new == MASK).all()
    else:
        assert ((new >= 5) & (new < 5 + N_WORDS)).all(), "replacement is a special or out-of-vocabulary id"


@pytest.mark.parametrize("name", TOKEN_LEVEL)
def test_token_level_determinism_and_p0(name, tokenizer, teacher):
    batch = make_batch(b=16, t=32, seed=3)
    aug = build(name, tokenizer, teacher, probability=0.3)
    first, again = aug(batch, gen(5)), aug(batch, gen(5))
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["input_ids"], aug(batch, gen(6))["input_ids"])
    assert torch.equal(aug.at_step(batch, 7)["input_ids"], aug.at_step(batch, 7)["input_ids"])
    assert not torch.equal(aug.at_step(batch, 7)["input_ids"], aug.at_step(batch, 8)["input_ids"])
    other_seed = build(name, tokenizer, teacher, probability=0.3, seed=1)
    assert not torch.equal(aug.at_step(batch, 7)["input_ids"], other_seed.at_step(batch, 7)["input_ids"])
    identity = build(name, tokenizer, teacher, probability=0.0)
    out = identity(batch, gen(5))
    assert all(torch.equal(out[k], batch[k]) for k in batch) and identity.last_rate == 0.0


def test_p1_changes_every_eligible_token(tokenizer, teacher):
    batch = make_batch(b=8, t=24, seed=4)
    for name in ("mask", "contextual"):
        aug = build(name, tokenizer, teacher, probability=1.0)
        out = aug(batch, gen(0))
        assert torch.equal(out["input_ids"] != batch["input_ids"], eligible(batch)) and aug.last_rate == 1.0


@pytest.mark.parametrize("sampling,k", [("uniform", 5), ("teacher", 3), ("uniform", 1)])
def test_contextual_draws_from_teacher_top_k(sampling, k, tokenizer, teacher):
    batch = make_batch(b=16, t=32, seed=2)
    aug = build("contextual", tokenizer, teacher, probability=0.5, top_k=k, sampling=sampling)
    out = aug(batch, gen(1))
    changed, logits, top = teacher_topk(teacher, batch, out, k)
    assert changed.sum() > 50
    new = out["input_ids"][changed]
    assert (top == new.unsqueeze(1)).any(1).all(), "a replacement is not among the teacher's top k"
    if k == 1:
        assert torch.equal(new, logits.argmax(1))
    else:  # more than one candidate is actually used
        assert (top == new.unsqueeze(1)).float().argmax(1).unique().numel() > 1


def test_contextual_restores_teacher_mode_and_needs_teacher(tokenizer, teacher):
    teacher.train()
    try:
        build("contextual", tokenizer, teacher, probability=0.5)(make_batch(b=4, t=16), gen(0))
        assert teacher.training
    finally:
        teacher.eval()
    with pytest.raises(AtmError, match="needs the teacher"):
        build("contextual", tokenizer, None)


# -------------------------------------------------------------------------------------------------- mixup


def test_mixup_batch_and_embeddings(tokenizer, teacher):
    batch = make_batch(b=8, t=24, seed=5)
    aug = build("mixup", tokenizer, teacher, alpha=0.4, seed=3)
    out = aug(batch, gen(2))
    index, lam = out[A.MIXUP_INDEX], out[A.MIXUP_LAMBDA]
    assert set(out) == set(batch) | {A.MIXUP_INDEX, A.MIXUP_LAMBDA}
    assert index.shape == (8,) and index.dtype == torch.long and lam.shape == () and lam.dtype == torch.float32
    assert sorted(index.tolist()) == list(range(8)) and (index != torch.arange(8)).all()
    assert 0.0 <= float(lam) <= 1.0
    assert aug.last_rate == pytest.approx(1 - float(lam)) and aug.last_metrics["augment/mixup_lambda"] == float(lam)
    assert torch.equal(out["input_ids"], batch["input_ids"]) and torch.equal(out["labels"], batch["labels"])
    m = batch["attention_mask"].bool()
    assert torch.equal(out["attention_mask"].bool(), m | m[index]) and out["attention_mask"].dtype == torch.long
    again = aug(batch, gen(2))
    assert torch.equal(again[A.MIXUP_INDEX], index) and torch.equal(again[A.MIXUP_LAMBDA], lam)
    other = aug(batch, gen(3))
    assert not (torch.equal(other[A.MIXUP_INDEX], index) and torch.equal(other[A.MIXUP_LAMBDA], lam))

    student = tiny_mlm(tokenizer, hidden=8, seed=1)
    for model in (teacher, student):  # each model mixes its OWN word embeddings
        w = model.get_input_embeddings().weight.detach()
        ids, union = out["input_ids"], out["attention_mask"]
        got = A.mixup_embeddings(model, ids, union, index, lam)
        hand = (float(lam) * w[ids] + (1 - float(lam)) * w[ids[index]]) * union.unsqueeze(-1)
        assert got.shape == (8, 24, w.shape[1])
        torch.testing.assert_close(got, hand)


def test_mixup_forward_matches_mlm_forward_without_mixing(teacher):
    batch = make_batch(b=6, t=20, seed=6)
    mixed = {**batch, A.MIXUP_INDEX: torch.arange(6), A.MIXUP_LAMBDA: torch.tensor(0.3)}  # self-pairs: no mixing
    positions = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = mlm_forward(teacher, batch["input_ids"], batch["attention_mask"], positions, output_hidden_states=True)
        got = A.mixup_mlm_forward(teacher, mixed, positions, output_hidden_states=True)
    torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-5, rtol=1e-4)
    assert len(got["hidden_states"]) == len(ref["hidden_states"])


def test_mixup_lambda_follows_alpha(tokenizer):
    batch = make_batch(b=4, t=12)
    lams = [float(build("mixup", tokenizer, None, alpha=1000.0).at_step(batch, s)[A.MIXUP_LAMBDA]) for s in range(5)]
    assert all(abs(x - 0.5) < 0.05 for x in lams)
    lams = [float(build("mixup", tokenizer, None, alpha=0.05).at_step(batch, s)[A.MIXUP_LAMBDA]) for s in range(20)]
    assert sum(min(x, 1 - x) < 0.05 for x in lams) >= 10  # U-shaped for small alpha


# ----------------------------------------------------------------------------------------------- repeated


@pytest.mark.parametrize("inner", TOKEN_LEVEL)
def test_repeated_copies_differ(inner, tokenizer, teacher):
    batch = make_batch(b=8, t=48, seed=7)
    aug = build("repeated", tokenizer, teacher, inner=inner, copies=3, probability=0.5)
    out = aug(batch, gen(0))
    assert out["input_ids"].shape == (24, 48)
    assert torch.equal(out[A.REPEAT_INDEX], torch.arange(8).repeat_interleave(3))
    for key in ("labels", "attention_mask"):
        assert torch.equal(out[key], batch[key].repeat_interleave(3, dim=0))
    rows = out["input_ids"].view(8, 3, 48)
    distinct = [len({tuple(r.tolist()) for r in rows[i]}) for i in range(8)]
    # independent draws per copy: two copies agree only by chance (0.5^n for n eligible tokens)
    assert min(distinct) >= 2 and distinct.count(3) >= 7, distinct
    rep = {k: v.repeat_interleave(3, dim=0) for k, v in batch.items()}
    ok = eligible(rep)
    changed = out["input_ids"] != rep["input_ids"]
    assert not (changed & ~ok).any()
    assert aug.last_rate == pytest.approx(float(changed.sum()) / float(ok.sum()))
    assert aug.last_rate == pytest.approx(0.5, abs=0.06)
    assert torch.equal(aug(batch, gen(0))["input_ids"], out["input_ids"])


# ----------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("options,match", [
    ({"name": "cutmix"}, r"augment\.name='cutmix' is not a known augmentation \(known: none, random_replace"),
    ({"name": "mask", "probability": 1.5}, r"augment\.probability"),
    ({"name": "random_replace", "probability": -0.1}, r"augment\.probability"),
    ({"name": "contextual", "probability": True}, r"augment\.probability"),
    ({"name": "mask", "probability": "high"}, r"augment\.probability"),
    ({"name": "mask", "top_k": 3}, r"augment\.top_k is not an option of augment\.name='mask'"),
    ({"name": "contextual", "top_k": 0}, r"augment\.top_k"),
    ({"name": "contextual", "sampling": "greedy"}, r"augment\.sampling"),
    ({"name": "mixup", "alpha": 0}, r"augment\.alpha"),
    ({"name": "repeated", "copies": 0}, r"augment\.copies"),
    ({"name": "repeated", "inner": "mixup"}, r"augment\.inner"),
    ({"name": "mask", "seed": 1.5}, r"augment\.seed"),
])
def test_config_errors(options, match, tokenizer, teacher):
    with pytest.raises(AtmError, match=match):
        A.build_augmentation(OmegaConf.create(options), tokenizer=tokenizer, teacher=teacher)
    with pytest.raises(AtmError, match=match):
        A.augmentation_key(options)


def test_presets_build_and_match_code_defaults(tokenizer, teacher):
    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    assert names == sorted(A.KNOWN)
    for name in names:
        cfg = OmegaConf.load(CONF / f"{name}.yaml")
        assert cfg.name == name
        aug = A.build_augmentation(cfg, tokenizer=tokenizer, teacher=teacher)
        assert (aug is None) == (name == "none")
        assert A.augmentation_key(cfg) == A.augmentation_key({"name": name}), f"{name}.yaml != DEFAULTS"
    assert A.build_augmentation(None, tokenizer=tokenizer, teacher=teacher) is None


def test_augmentation_key():
    key = A.augmentation_key({"name": "mask", "probability": 0.1, "seed": 0})
    assert len(key) == 16 and int(key, 16) >= 0
    # pinned: a change of the canonical form (or ALGORITHM_VERSION) must be deliberate, it invalidates caches
    assert key == "8cac057baf379519"
    assert key == A.augmentation_key(OmegaConf.create({"name": "mask"}))
    assert key != A.augmentation_key({"name": "mask", "seed": 1})
    assert key != A.augmentation_key({"name": "mask", "probability": 0.2})
    assert key != A.augmentation_key({"name": "random_replace"})
    assert A.augmentation_key(None) == A.augmentation_key({"name": "none"}) == A.augmentation_key({"name": "none",
                                                                                                   "seed": 4})
    # options a method does not read do not change its key
    assert A.augmentation_key({"name": "repeated"}) == A.augmentation_key({"name": "repeated", "top_k": 9})
    assert A.augmentation_key({"name": "repeated", "inner": "contextual"}) != A.augmentation_key(
        {"name": "repeated", "inner": "contextual", "top_k": 9})
    assert A.augmentation_key({"name": "mixup"}) == A.augmentation_key({"name": "mixup", "probability": 0.9})


def test_step_generator_is_stable():
    a = torch.rand(5, generator=A.step_generator(3, 10))
    assert torch.equal(a, torch.rand(5, generator=A.step_generator(3, 10)))
    assert not torch.equal(a, torch.rand(5, generator=A.step_generator(3, 11)))
    assert not torch.equal(a, torch.rand(5, generator=A.step_generator(4, 10)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_with_cpu_generator_matches_cpu(tokenizer):
    import copy

    batch = make_batch(b=8, t=24, seed=8)
    on_gpu = {k: v.cuda() for k, v in batch.items()}
    teacher = tiny_mlm(tokenizer)
    gpu_teacher = copy.deepcopy(teacher).cuda()
    for name, options in [("random_replace", {}), ("mask", {}), ("mixup", {}),
                          ("repeated", {"inner": "mask"}), ("contextual", {})]:
        cpu_out = build(name, tokenizer, teacher, **options)(batch, gen(0))
        gpu_out = build(name, tokenizer, gpu_teacher, **options)(on_gpu, gen(0))
        assert set(cpu_out) == set(gpu_out)
        for key, value in gpu_out.items():
            assert value.device.type == "cuda", (name, key)
            if name != "contextual":  # the teacher's numerics may differ on the GPU
                assert torch.equal(value.cpu(), cpu_out[key]), (name, key)
