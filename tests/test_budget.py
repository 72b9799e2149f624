"""The short-budget recipe's engine and stage parts: learning-rate schedules (golden values), bf16 detection,
torch.compile of the encoders, and the config checks of the new keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from atm.engine import loop
from atm.errors import AtmError


def _trainer(**kw):
    base = {"max_steps": 10, "lr": 1.0, "weight_decay": 0.0, "warmup_steps": 2, "precision": "fp32",
            "grad_clip": 1.0, "grad_accum_steps": 1, "backend": "torch"}
    return OmegaConf.create({**base, **kw})


def _lrs(cfg) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = loop.make_scheduler(optimizer, cfg)
    lrs = []
    for _ in range(cfg.max_steps + 1):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedules_golden():
    # one_cycle (Cramming's triangle): 0 -> peak at half the steps -> 0 at max_steps
    assert _lrs(_trainer(schedule="one_cycle")) == pytest.approx([0, .2, .4, .6, .8, 1, .8, .6, .4, .2, 0])
    assert _lrs(_trainer(schedule="one_cycle", peak_fraction=0.2)) == pytest.approx(
        [0, .5, 1, .875, .75, .625, .5, .375, .25, .125, 0])
    # linear (the default, also without the key): warm-up over warmup_steps, then linear decay to 0
    linear = [0, .5, 1, .875, .75, .625, .5, .375, .25, .125, 0]
    assert _lrs(_trainer()) == pytest.approx(linear) and _lrs(_trainer(schedule="linear")) == pytest.approx(linear)
    assert _lrs(_trainer(schedule="constant")) == pytest.approx([0, .5] + [1] * 9)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("schedule", "cosine", "trainer.schedule='cosine' must be one of linear, one_cycle, constant"),
    ("peak_fraction", 1.0, "trainer.peak_fraction=1.0 must be a number in (0, 1)"),
    ("compile", "yes", "trainer.compile='yes' must be true or false"),
    ("precision", "fp8", "trainer.precision='fp8' must be one of fp32, bf16, fp16, auto"),
    ("max_steps", -5, "trainer.max_steps=-5 must be an integer >= 1"),
    ("max_steps", "abc", "trainer.max_steps='abc' must be an integer >= 1"),
    ("batch_size", 0, "trainer.batch_size=0 must be an integer >= 1"),
    ("lr", -0.001, "trainer.lr=-0.001 must be a number > 0"),
    ("weight_decay", -1, "trainer.weight_decay=-1 must be a number >= 0"),
    ("grad_clip", -1.0, "trainer.grad_clip=-1.0 must be a number >= 0 or null"),
    ("warmup_steps", -1, "trainer.warmup_steps=-1 must be an integer >= 0"),
    ("log_every", 0, "trainer.log_every=0 must be an integer >= 1"),
    ("save_every", 0, "trainer.save_every=0 must be an integer >= 1 or null"),
    ("keep_last", 0, "trainer.keep_last=0 must be an integer >= 1 or null"),
    ("device", "tpu", "trainer.device='tpu' must be auto, cpu, cuda or cuda:<index>"),
])
def test_bad_trainer_keys_are_one_line_errors(key, value, message):
    with pytest.raises(AtmError) as err:
        loop.check_trainer(_trainer(**{key: value}))
    assert str(err.value) == message


def test_precision_auto_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
        assert loop.bf16_native(cpu) == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert loop.resolve_precision("fp32", cpu) == "fp32" and loop.resolve_precision("bf16", cpu) == "bf16"
    for avx512_bf16, amx, expected in [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert loop.resolve_precision("auto", cpu) == expected


def test_compile_encoders_keeps_parameter_names():
    from transformers import RobertaPreLayerNormConfig, RobertaPreLayerNormForMaskedLM

    model = RobertaPreLayerNormForMaskedLM(RobertaPreLayerNormConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=20))
    keys = list(model.state_dict())
    module = torch.nn.ModuleDict({"student": model, "projection": torch.nn.Linear(16, 16)})
    assert loop.compile_encoders(module) == 1  # the base model only (not the MLM wrapper, not the projection)
    assert model.base_model._compiled_call_impl is not None and list(model.state_dict()) == keys


@pytest.mark.parametrize(("data", "stage", "message"), [
    ({"packing": "yes"}, {}, "data.packing='yes' must be true or false"),
    ({"max_seq_len": 2}, {}, "data.max_seq_len=2 must be an integer >= 3 (<s>, a token, </s>)"),
    ({}, {"dropout": 1.0}, "stage.dropout=1.0 must be null (the model's own) or a probability in [0, 1)"),
    ({}, {"mlm_probability": 1.0}, "stage.mlm_probability=1.0 must be a probability in (0, 1)"),
    ({}, {"mlm_probability": 0}, "stage.mlm_probability=0 must be a probability in (0, 1)"),
    ({}, {"corpus": "tweets"}, "stage.corpus='tweets' must be 'written' or 'spoken'"),
    ({"max_seq_len": "abc"}, {}, "data.max_seq_len='abc' must be an integer >= 3 (<s>, a token, </s>)"),
    ({"written": {"max_lines_per_source": 0}}, {},
     "data.written.max_lines_per_source=0 must be an integer >= 1 or null"),
])
def test_mlm_data_and_stage_keys_are_checked(data, stage, message):
    from atm.stages.common import check_mlm_data

    good = {"corpus": "written", "mlm_probability": 0.15}
    cfg = OmegaConf.create({"data": {"packing": True, "max_seq_len": 64, **data}, "stage": {**good, **stage}})
    with pytest.raises(AtmError) as err:
        check_mlm_data(cfg)
    assert str(err.value) == message
    check_mlm_data(OmegaConf.create({"data": {"packing": False, "max_seq_len": 3},
                                     "stage": {**good, "dropout": 0.0}}))
