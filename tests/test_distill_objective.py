"""The distillation objective on real tiny pre-LN RoBERTa models: every intermediate loss, every layer
mapping and every augmentation is selectable by name, trains (gradients reach the student and the
critics), and keeps projections and critics out of the student."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM, XLMRobertaTokenizer

from atm.distill import augment as A
from atm.distill.losses import LOSSES
from atm.distill.objective import DistillationObjective
from atm.models.attention import set_attention_scores
from atm.models.encoder import mlm_forward

V = 60


def _model(layers, hidden, heads, seed):
    torch.manual_seed(seed)
    cfg = RobertaPreLayerNormConfig(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=2 * hidden,
                                    max_position_embeddings=40, pad_token_id=1)
    return RobertaPreLayerNormForMaskedLM(cfg)


def _cfg(loss, mapping="uniform", **kw):
    return OmegaConf.create({
        "hard_weight": 1.0,
        "logit": {"loss": "soft_ce", "weight": 1.0, "temperature": 2.0, "temperature_end": None,
                  "t_squared": False, "positions": "masked"},
        "intermediate": {"loss": loss, "weight": 1.0, "layer_mapping": mapping, "heads": "mean", "options": {},
                         **kw}})


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (4, 10), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones_like(ids)
    ids[3, 7:], mask[3, 7:] = 1, 0
    labels = torch.full_like(ids, -100)
    labels[:, 2], labels[:, 4] = ids[:, 2], ids[:, 4]
    ids = ids.clone()
    ids[:, 2] = 4  # <mask>
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _step(objective, teacher, student, batch, step=1):
    kw = {"output_hidden_states": objective.needs_hidden_states, "output_attentions": objective.needs_attentions}
    for m in (teacher, student):
        set_attention_scores(m, objective.needs_attentions)
    positions = objective.positions(batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        out_t = mlm_forward(teacher, batch["input_ids"], batch["attention_mask"], positions, **kw)
    out_s = mlm_forward(student, batch["input_ids"], batch["attention_mask"], positions, **kw)
    return objective(out_s, out_t, batch["labels"][positions], step)


INTERMEDIATE = sorted(n for n, s in LOSSES.items() if s.kind in ("hidden", "pooled", "attention"))


@pytest.mark.parametrize("loss", INTERMEDIATE)
@pytest.mark.parametrize("mapping", ["uniform", "skip", "last", "first", "emd"])
def test_every_intermediate_loss_and_mapping_trains(loss, mapping):
    teacher = _model(4, 32, 4, seed=0).eval()
    student = _model(2, 16, 2, seed=1)
    objective = DistillationObjective(_cfg(loss, mapping), teacher.config, student.config)
    total, parts = _step(objective, teacher, student, _batch())
    assert torch.isfinite(total) and set(parts) == {"mlm", "soft_ce", loss}
    total.backward()
    assert student.roberta_prelayernorm.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    for p in objective.parameters():  # projections and critics are trained
        assert p.grad is not None
    names = set(student.state_dict())
    assert not any(n.startswith(("projections", "inter_losses")) for n in names)


def test_soft_mapping_weights_pairs_by_transport_plan():
    teacher, student = _model(4, 16, 2, seed=0).eval(), _model(2, 16, 2, seed=1)
    objective = DistillationObjective(_cfg("hidden_mse", "emd"), teacher.config, student.config)
    assert len(objective.pairs) == 8 and objective.soft
    _, parts = _step(objective, teacher, student, _batch())
    uniform = DistillationObjective(_cfg("hidden_mse", "first"), teacher.config, student.config)
    # the transport plan moves mass to cheap pairs: never worse than the mean over all 8 pairs
    assert parts["hidden_mse"] > 0 and uniform.pairs == [(1, 1), (2, 2)]


def test_temperature_schedule_and_t_squared():
    teacher, student = _model(2, 16, 2, seed=0).eval(), _model(2, 16, 2, seed=1)
    cfg = _cfg(None)
    cfg.logit.temperature_end = 1.0
    cfg.logit.temperature = 4.0
    objective = DistillationObjective(cfg, teacher.config, student.config, max_steps=10)
    assert [objective.temperature(s) for s in (0, 5, 10, 20)] == [4.0, 2.5, 1.0, 1.0]
    batch = _batch()
    plain, parts = _step(objective, teacher, student, batch, step=10)
    cfg.logit.t_squared = True
    cfg.logit.temperature_end = None
    squared = DistillationObjective(cfg, teacher.config, student.config)
    total, parts2 = _step(squared, teacher, student, batch)
    assert total.item() == pytest.approx(parts2["mlm"] + 16 * parts2["soft_ce"], rel=1e-5)


@pytest.mark.parametrize("name", [n for n in A.KNOWN if n != "none"])
def test_every_augmentation_feeds_the_objective(name):
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=vocab + [(f"▁w{i}", -1.0) for i in range(V - 5)])
    teacher, student = _model(4, 32, 4, seed=0).eval(), _model(2, 16, 2, seed=1)
    aug = A.build_augmentation(OmegaConf.create({"name": name, "probability": 0.3}), tokenizer=tokenizer,
                               teacher=teacher)
    batch = aug.at_step(_batch(), step=3)
    objective = DistillationObjective(_cfg("hidden_mse"), teacher.config, student.config)
    positions = objective.positions(batch["labels"], batch["attention_mask"])
    forward = A.mixup_mlm_forward if A.MIXUP_INDEX in batch else (
        lambda m, b, p, **kw: mlm_forward(m, b["input_ids"], b["attention_mask"], p, **kw))
    out_t = forward(teacher, batch, positions, output_hidden_states=True)
    out_s = forward(student, batch, positions, output_hidden_states=True)
    total, _ = objective(out_s, out_t, batch["labels"][positions], 3, batch.get(A.MIXUP_LAMBDA, 1.0))
    assert torch.isfinite(total)
    if name != "mixup":
        assert aug.last_rate > 0


@pytest.mark.parametrize("logit", ["soft_ce", "logit_mse_over_t", None])
@pytest.mark.parametrize("hard_weight", [0.0, 1.0])
def test_batch_without_masked_token_contributes_zero(logit, hard_weight):
    """No masked token: the hard and logit terms are 0 (not NaN, which stops fit even times hard_weight 0);
    the hidden-state term still trains the student."""
    teacher, student = _model(4, 32, 4, seed=0).eval(), _model(2, 16, 2, seed=1)
    cfg = _cfg("hidden_mse")
    cfg.hard_weight, cfg.logit.loss = hard_weight, logit
    objective = DistillationObjective(cfg, teacher.config, student.config)
    batch = _batch()
    batch["labels"][:] = -100
    total, parts = _step(objective, teacher, student, batch)
    assert parts["mlm"] == 0.0 and parts.get(logit, 0.0) == 0.0 and parts["hidden_mse"] > 0
    assert total.item() == pytest.approx(parts["hidden_mse"], rel=1e-6)
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert student.roberta_prelayernorm.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
