"""analysis/bench_scale.py's estimates against values worked out by hand: parameter counts of a meta-device build,
the ZeRO paper's model states (its own fig. 1 example), DeepSpeed's estimator, Korthikanti et al.'s activations;
and its tables for a tiny preset (in process, seconds)."""

from __future__ import annotations

import pytest

from analysis import bench_scale
from analysis._scale import (
    Shape,
    VocabOnly,
    activations,
    deepspeed_estimator,
    deepspeed_model_states,
    layer_activations,
    memory,
    meta_model,
    model_states,
    shape_of,
)
from atm.models.encoder import build_mlm, load_preset

# teacher_tiny (H 128, L 4, F 512, 258 positions) with a 2,000-piece vocabulary, by hand (count_parameters' doc):
# embedding V H + P H + H + V = 256,000 + 33,024 + 128 + 2,000 = 291,152
# per layer 4 H^2 + 2 H F + 9 H + F = 65,536 + 131,072 + 1,152 + 512 = 198,272
# non-embedding 2 H + 4 x 198,272 + 2 H + H^2 + H + 2 H = 256 + 793,088 + 256 + 16,384 + 128 + 256 = 810,368
TINY_PARAMS, TINY_NON_EMBEDDING = 291_152 + 810_368, 810_368
# the LM head's decoder holds the tied word embedding V H and the output bias V: 256,000 + 2,000
TINY_LARGEST_LAYER = 258_000


def test_meta_build_counts_what_a_real_build_has():
    preset = load_preset("teacher_tiny")
    meta = meta_model(preset, 2000)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    real = shape_of("teacher_tiny", build_mlm(preset, VocabOnly(2000), seed=0))
    assert shape_of("teacher_tiny", meta) == real
    assert (real.params, real.non_embedding, real.largest_layer) == (TINY_PARAMS, TINY_NON_EMBEDDING,
                                                                     TINY_LARGEST_LAYER)


def test_model_states_reproduce_the_zero_papers_example():
    """ZeRO paper fig. 1: Ψ = 7.5B, N = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per GPU (GB = 1e9 bytes)."""
    psi, gb = 7_500_000_000, 1e9
    totals = [sum(model_states(psi, "bf16", stage, 64)) / gb for stage in (0, 1, 2, 3)]
    assert totals == pytest.approx([120.0, 31.40625, 16.640625, 1.875])  # 16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N
    assert model_states(10, "fp32", 0, 1) == (40, 40, 80)  # 4 + 4 + 8 bytes per parameter
    with pytest.raises(ValueError, match="ZeRO stage"):
        model_states(10, "bf16", 4, 1)


def test_zero_model_states_equal_deepspeeds_estimator():
    # 4 GPUs, teacher_tiny: ZeRO-3 4 x 258,000 + int(18 x 1,101,520 / 4) = 1,032,000 + 4,956,840;
    # ZeRO-2 2 x 1,101,520 + 4,956,840
    zero3, zero2 = 5_988_840, 7_159_880
    assert deepspeed_model_states(TINY_PARAMS, TINY_LARGEST_LAYER, 3, 4) == zero3
    assert deepspeed_model_states(TINY_PARAMS, TINY_LARGEST_LAYER, 2, 4) == zero2
    assert deepspeed_model_states(TINY_PARAMS, TINY_LARGEST_LAYER, 1, 4) is None
    pytest.importorskip("deepspeed")
    assert deepspeed_estimator(TINY_PARAMS, TINY_LARGEST_LAYER, 3, 4) == zero3
    assert deepspeed_estimator(TINY_PARAMS, TINY_LARGEST_LAYER, 2, 4) == zero2


def test_activations_follow_korthikanti_eq_1():
    # s 4, b 2, h 8, a 2: s b h = 64; 16-bit 64 (34 + 5 x 2 x 4 / 8) = 2,496; fp32 64 (66 + 9) = 4,800
    assert layer_activations(4, 2, 8, 2, "bf16") == 2496
    assert layer_activations(4, 2, 8, 2, "fp32") == 4800
    shape = Shape("x", 0, 0, 0, layers=2, hidden=8, heads=2, vocab=100)
    # + embedding mask 64 + head 4 x 64 (1 + 0.15 x 100 / 8) = 736; checkpointing: 2 inputs of 2 x 64 + one layer
    assert activations(shape, 4, 2, "bf16") == pytest.approx(2 * 2496 + 64 + 736)
    assert activations(shape, 4, 2, "bf16", checkpointing=True) == pytest.approx(2 * 128 + 2496 + 64 + 736)


def test_fits_and_largest_batch():
    shape = Shape("x", 1000, 0, 100, layers=2, hidden=8, heads=2, vocab=100)
    # ZeRO 0, 1 GPU: states 16,000 (DeepSpeed: none); activations per sequence (4 tokens) 5,792 / 2 = 2,896
    m = memory(shape, zero_stage=0, gpus=1, precision="bf16", batch=2, seq_len=4, gpu_bytes=30_000, reserve_bytes=0)
    assert (m.states, m.total, m.fits, m.max_batch) == (16_000, 21_792, True, 4)  # 14,000 // 2,896
    m = memory(shape, zero_stage=2, gpus=1, precision="bf16", batch=2, seq_len=4, gpu_bytes=30_000, reserve_bytes=0)
    assert m.deepspeed == 20_000 and m.max_batch == 3  # DeepSpeed's 2Ψ + 18Ψ is the larger: 10,000 // 2,896


def test_tables_for_a_tiny_preset(capsys):
    assert bench_scale.main(["--presets", "teacher_tiny", "--vocab-size", "2000", "--zero", "0,3", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "| teacher_tiny | 4 x 128 (4 heads) | 0.8M | 1.1M |" in out
    assert "| teacher_tiny | 3 |" in out and "| teacher_tiny | 1 |" not in out
    assert "equals its restatement in analysis/_scale.py for every preset: yes" in out or "not installed" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpus", "0"], "--gpus must be >= 1, got 0"),
    (["--presets", "teacher_99b"], "--presets: teacher_99b not among"),
    (["--zero", "0,5"], "--zero: 5 not among 0, 1, 2, 3"),
    (["--presets", "teacher_tiny", "--seq-len", "300"], "--seq-len for teacher_tiny: max_seq_len=300 does not fit"),
])
def test_bad_options_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_scale.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
