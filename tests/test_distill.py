"""Golden values for every registered loss, layer-mapping tables and objective validation."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import RobertaPreLayerNormConfig

from atm.distill.losses import LOSSES, get_loss
from atm.distill.mapping import get_mapping, transport_plan
from atm.distill.objective import DistillationObjective
from atm.errors import AtmError

Z_S = torch.tensor([[0.0, math.log(3.0)]])  # student softmax (1/4, 3/4)
Z_T = torch.tensor([[0.0, 0.0]])  # teacher softmax (1/2, 1/2)


def test_soft_ce_golden():
    # -(1/2 ln 1/4 + 1/2 ln 3/4)
    assert LOSSES["soft_ce"].fn(Z_S, Z_T).item() == pytest.approx(0.5 * (math.log(4) + math.log(4 / 3)), abs=1e-6)
    # T = 2: student softmax (1, sqrt 3) / (1 + sqrt 3)
    q = 1 / (1 + math.sqrt(3))
    assert LOSSES["soft_ce"].fn(Z_S, Z_T, temperature=2.0).item() == pytest.approx(
        -0.5 * (math.log(q) + math.log(1 - q)), abs=1e-6)


def test_kl_golden_and_relation_to_soft_ce():
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert LOSSES["kl"].fn(Z_S, Z_T).item() == pytest.approx(expected, abs=1e-6)
    # KL = soft CE - entropy(teacher) on random tensors
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    p = torch.softmax(zt / 3, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    assert LOSSES["kl"].fn(zs, zt, 3.0).item() == pytest.approx(
        (LOSSES["soft_ce"].fn(zs, zt, 3.0) - entropy).item(), abs=1e-5)
    # and torch's reference implementation
    ref = torch.nn.functional.kl_div(torch.log_softmax(zs / 3, -1), p, reduction="batchmean")
    assert LOSSES["kl"].fn(zs, zt, 3.0).item() == pytest.approx(ref.item(), abs=1e-6)


def test_logit_mse_golden():
    assert LOSSES["logit_mse"].fn(Z_S, Z_T).item() == pytest.approx(math.log(3) ** 2 / 2, abs=1e-6)


def test_hidden_mse_ignores_padding():
    h_s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    h_t = torch.zeros(1, 2, 2)
    mask = torch.tensor([[1, 0]])
    assert LOSSES["hidden_mse"].fn(h_s, h_t, mask).item() == pytest.approx(2.5)


def test_mlm_ce_golden():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 1.0]]])
    labels = torch.tensor([[1, -100]])
    assert LOSSES["mlm_ce"].fn(logits, labels).item() == pytest.approx(-math.log(0.75), abs=1e-6)


# PKD (Sun et al. 2019) leaves the top layer pair to the logit loss in both skip and last; the official code
# distils a 3-layer student from 12-layer teacher layers 10, 11 (PKD-Last) and a 6-layer one from layers
# 2, 4, 6, 8, 10 (PKD-Skip).
@pytest.mark.parametrize("n_t,n_s,uniform,skip,last", [
    (12, 3, [(0, 0), (1, 4), (2, 8), (3, 12)], [(1, 4), (2, 8)], [(1, 10), (2, 11)]),
    (12, 4, [(0, 0), (1, 3), (2, 6), (3, 9), (4, 12)], [(1, 3), (2, 6), (3, 9)],
     [(1, 9), (2, 10), (3, 11)]),
    (12, 6, [(0, 0), (1, 2), (2, 4), (3, 6), (4, 8), (5, 10), (6, 12)], [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)],
     [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]),
    (24, 4, [(0, 0), (1, 6), (2, 12), (3, 18), (4, 24)], [(1, 6), (2, 12), (3, 18)],
     [(1, 21), (2, 22), (3, 23)]),
    (12, 1, [(0, 0), (1, 12)], [], []),
])
def test_mapping_tables(n_t, n_s, uniform, skip, last):
    assert get_mapping("uniform", n_t, n_s) == uniform
    assert get_mapping("skip", n_t, n_s) == skip
    assert get_mapping("last", n_t, n_s) == last
    assert get_mapping("first", n_t, n_s) == [(m, m) for m in range(1, n_s + 1)]
    assert get_mapping("emd", n_t, n_s) == [(m, n) for m in range(1, n_s + 1) for n in range(1, n_t + 1)]


def test_transport_plan_marginals_and_preference():
    cost = torch.tensor([[0.1, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.1]])
    plan = transport_plan(cost)
    assert torch.allclose(plan.sum(1), torch.full((2,), 0.5), atol=1e-4)
    assert torch.allclose(plan.sum(0), torch.full((4,), 0.25), atol=1e-4)
    assert plan[0, 0] > plan[0, 3] and plan[1, 3] > plan[1, 0]  # mass flows along cheap pairs


def test_mapping_errors():
    with pytest.raises(AtmError, match="more layers"):
        get_mapping("uniform", 4, 12)
    with pytest.raises(AtmError, match="more layers"):
        get_mapping("last", 4, 12)
    for name in ("skip", "last"):  # a 1-layer student has only the top layer, left to the logit loss
        with pytest.raises(AtmError, match=f"layer_mapping={name} maps no layer"):
            DistillationObjective(_distill_cfg(intermediate={"layer_mapping": name}), _config(),
                                  _config(num_hidden_layers=1))
    with pytest.raises(AtmError, match="layer_mapping='nope'"):
        get_mapping("nope", 12, 4)


def test_unknown_loss_names_the_key():
    with pytest.raises(AtmError, match=r"distill.logit.loss='nope'.*soft_ce"):
        get_loss("nope", "logit", "distill.logit.loss")
    with pytest.raises(AtmError, match="hidden loss"):  # right name, wrong kind
        get_loss("soft_ce", "hidden")


def _config(**kw):
    base = dict(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)
    return RobertaPreLayerNormConfig(**{**base, **kw})


def _distill_cfg(**kw):
    cfg = OmegaConf.create({"hard_weight": 1.0,
                            "logit": {"loss": "soft_ce", "weight": 1.0, "temperature": 2.0, "temperature_end": None,
                                      "t_squared": False, "positions": "masked"},
                            "intermediate": {"loss": "hidden_mse", "weight": 1.0, "layer_mapping": "uniform",
                                             "heads": "match", "options": {}}})
    return OmegaConf.merge(cfg, kw)


def test_objective_projections_and_total():
    teacher, student = _config(), _config(hidden_size=8, num_hidden_layers=2)
    obj = DistillationObjective(_distill_cfg(), teacher, student)
    assert obj.pairs == [(0, 0), (1, 2), (2, 4)]
    assert [tuple(p.weight.shape) for p in obj.projections] == [(16, 8)] * 3
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 3, dtype=torch.long)
    out_s = {"logits": torch.randn(2, 3, 50, generator=g), "attention_mask": mask,
             "hidden_states": tuple(torch.randn(2, 3, 8, generator=g) for _ in range(3))}
    out_t = {"logits": torch.randn(2, 3, 50, generator=g), "attention_mask": mask,
             "hidden_states": tuple(torch.randn(2, 3, 16, generator=g) for _ in range(5))}
    labels = torch.tensor([[5, -100, -100], [-100, 7, -100]])
    keep = obj.positions(labels, mask)
    assert keep.tolist() == [[True, False, False], [False, True, False]]
    sel_s = {**out_s, "logits": out_s["logits"][keep]}
    sel_t = {**out_t, "logits": out_t["logits"][keep]}
    total, parts = obj(sel_s, sel_t, labels[keep])
    assert parts["soft_ce"] == pytest.approx(LOSSES["soft_ce"].fn(sel_s["logits"], sel_t["logits"], 2.0).item(), rel=1e-5)
    assert parts["mlm"] == pytest.approx(LOSSES["mlm_ce"].fn(out_s["logits"], labels).item(), rel=1e-5)
    assert total.item() == pytest.approx(parts["mlm"] + parts["soft_ce"] + parts["hidden_mse"], rel=1e-5)
    # same width: no projection
    assert len(DistillationObjective(_distill_cfg(), teacher, _config(num_hidden_layers=2)).projections) == 0


def test_objective_rejects_impossible_combinations():
    with pytest.raises(AtmError, match="vocabularies differ"):
        DistillationObjective(_distill_cfg(), _config(), _config(vocab_size=60))
    with pytest.raises(AtmError, match="more layers"):
        DistillationObjective(_distill_cfg(), _config(num_hidden_layers=2), _config(num_hidden_layers=4))
    with pytest.raises(AtmError, match="distill.intermediate.loss='cosine_x'"):
        DistillationObjective(_distill_cfg(intermediate={"loss": "cosine_x"}), _config(), _config())
    with pytest.raises(AtmError, match="4 attention heads and the student 3"):
        DistillationObjective(_distill_cfg(intermediate={"loss": "attention_mse", "heads": "mean"}),
                              _config(num_attention_heads=4, hidden_size=16), _config(num_attention_heads=3, hidden_size=12))
    with pytest.raises(AtmError, match="heads=mean"):
        DistillationObjective(_distill_cfg(intermediate={"loss": "attention_kl"}),
                              _config(num_attention_heads=4), _config(num_attention_heads=2))
    with pytest.raises(AtmError, match="has no option"):
        DistillationObjective(_distill_cfg(intermediate={"loss": "infonce", "options": {"alpha": 0.5}}),
                              _config(), _config())


def test_teacher_switch_state_restores_the_second_teacher(monkeypatch):
    """fit saves a callback's state_dict with the training state: a distillation resumed after the switch must
    go on with the second teacher, from the step it switched at, not switch again at the resumed step."""
    from atm.lineage import Input
    from atm.stages import distill as D

    logged = []
    monkeypatch.setattr(D.mlflow, "log_metric", lambda key, value, step: logged.append((key, value, step)))
    cfg = OmegaConf.create({"distill": {"switch": {"criterion": "steps", "steps": 3}}, "augment": {"name": "none"},
                            "data": {"max_seq_len": 16}})

    def fresh():
        teachers = [D.Teacher(torch.nn.Linear(1, 1), Input(role, Path(role))) for role in ("teacher", "teacher_next")]
        state = {"teacher": teachers[0], "augmentation": None}
        return D.TeacherSwitch(cfg, teachers, state, student=None, tokenizer=None), teachers, state

    switch, teachers, state = fresh()
    assert switch.state_dict()["since_step"] is None
    for step in (1, 2, 3, 4):
        switch(step)
    assert state["teacher"] is teachers[1] and teachers[1].since_step == 4
    assert logged == [("distill/teacher", 1, 4)]  # once, at the first step taught by the second teacher
    saved = switch.state_dict()

    resumed, teachers2, state2 = fresh()
    resumed.load_state_dict(saved)
    assert state2["teacher"] is teachers2[1] and teachers2[1].since_step == 4
    resumed(7)
    assert teachers2[1].since_step == 4 and len(logged) == 1
    before, teachers3, state3 = fresh()
    before.load_state_dict({"since_step": None, "best": float("inf"), "bad": 0})
    assert state3["teacher"] is teachers3[0]
