"""Teacher-output cache: round trip, top-k renormalisation, per-layer filling, keys, config checks."""

import pytest
import torch
from omegaconf import OmegaConf

from atm.distill.cache import MISSING_LOGIT, TeacherCache, cache_key, check_cache_config
from atm.distill.losses import soft_ce
from atm.errors import AtmError


def _outputs(seed=0, n=5, v=30, layers=3):
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(5, v, (2, 4), generator=g), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": torch.full((2, 4), -100)}
    out = {"logits": torch.randn(n, v, generator=g), "attention_mask": batch["attention_mask"],
           "hidden_states": tuple(torch.randn(2, 4, 8, generator=g) for _ in range(layers + 1)),
           "attentions": tuple(torch.randn(2, 2, 4, 4, generator=g) for _ in range(layers))}
    return batch, out


def test_round_trip_full_logits_and_selected_layers(tmp_path):
    batch, out = _outputs()
    cache = TeacherCache(tmp_path, "k", top_k=None, hidden_layers=[0, 2], attention_layers=[1])
    assert cache.load(1, 30, 4, 3) is None and cache.misses == 1
    cache.store(1, batch, out)
    got_batch, got = cache.load(1, 30, 4, 3)
    assert cache.hits == 1
    assert torch.equal(got_batch["input_ids"], batch["input_ids"])
    assert torch.allclose(got["logits"], out["logits"], atol=1e-2)  # float16 on disk
    assert torch.allclose(got["hidden_states"][2], out["hidden_states"][2], atol=1e-2)
    assert got["hidden_states"][1] is None and got["attentions"][0] is None
    assert torch.allclose(got["attentions"][1], out["attentions"][1], atol=1e-2)
    assert not list(tmp_path.rglob("*.tmp"))


def test_top_k_gives_the_renormalised_teacher_distribution(tmp_path):
    batch, out = _outputs()
    cache = TeacherCache(tmp_path, "k", top_k=4)
    cache.store(1, batch, out)
    _, got = cache.load(1, 30, 0, 0)
    top = out["logits"].topk(4, dim=-1)
    assert (got["logits"] == MISSING_LOGIT).sum(-1).tolist() == [26] * 5
    for T in (1.0, 2.0):
        p = torch.softmax(got["logits"] / T, -1)
        q = torch.softmax(top.values / T, -1)  # renormalised over the top k
        assert torch.allclose(p.gather(1, top.indices), q, atol=2e-3)
        z_s = torch.randn(5, 30)
        ref = -(q * torch.log_softmax(z_s / T, -1).gather(1, top.indices)).sum(-1).mean()
        assert soft_ce(z_s, got["logits"], T).item() == pytest.approx(ref.item(), abs=2e-3)


def test_a_new_layer_is_a_miss_then_added(tmp_path):
    batch, out = _outputs()
    TeacherCache(tmp_path, "k", None, hidden_layers=[1]).store(1, batch, out)
    wider = TeacherCache(tmp_path, "k", None, hidden_layers=[1, 3])
    assert wider.load(1, 30, 4, 3) is None
    wider.store(1, batch, out)
    assert wider.load(1, 30, 4, 3) is not None
    assert wider.size_bytes() > 0


def test_keys_change_with_what_changes_the_tensors():
    base = dict(teacher="run1", seed=0, augment="a", top_k=64)
    assert cache_key(**base) == cache_key(**dict(reversed(list(base.items()))))
    for change in ({"teacher": "run2"}, {"seed": 1}, {"augment": "b"}, {"top_k": None}):
        assert cache_key(**{**base, **change}) != cache_key(**base)


@pytest.mark.parametrize("loss", ["logit_mse", "logit_mse_over_t"])
def test_logit_mse_needs_all_logits(loss):
    cfg = OmegaConf.create({"logit": {"loss": loss}, "cache": {"enabled": True, "top_k": 8}})
    with pytest.raises(AtmError, match=f"distill.cache.top_k.*distill.logit.loss={loss} "):
        check_cache_config(cfg)
    cfg.cache.top_k = None
    check_cache_config(cfg)
