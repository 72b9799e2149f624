"""`+experiment=alexatm_gpu` (the paper's shapes for one GPU) end to end on the CPU: one real multirun of every job
of the GPU configuration, with its model presets replaced by the CPU ones and the sizes of the tiny alexatm_mini
test (tests/conftest.py: tiny_experiment), on ``trainer.device=cpu`` and the configuration's own precision, bf16
(autocast on the CPU). The shapes themselves are sized without a GPU by analysis/bench_scale.py
(tests/test_bench_scale.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import atm_train, finished_runs_by_stage, tiny_experiment

CPU_PRESETS = {"alexatm.teachers.s": "teacher_tiny_s", "alexatm.teachers.m": "teacher_tiny_m",
               "alexatm.teachers.l": "teacher_tiny", "alexatm.students.intermediate": "intermediate_tiny",
               "alexatm.students.final": "student_tiny"}
# the GPU configuration, with its device and presets swapped (the device reaches the inputs lineage trains,
# like `cost`, which skips the students' latency timing); its probes cut to the tiny test's sizes and to two
# languages (8 evaluations of every checkpoint), and the 500 steps the secondary fine-tuning jobs set for
# themselves to 4 (trainer.* is not inherited: the jobs' own)
TINY_GPU = [*tiny_experiment("alexatm_gpu", inherit=("trainer.device", "cost")), "trainer.device=cpu",
            *(f"{key}={value}" for key, value in CPU_PRESETS.items()), "cost.latency_runs=0",
            "eval.perplexity.written_languages=[en,de]", "eval.perplexity.spoken_locales=[en-US,de-DE]",
            "eval.mask_fill.languages=[en,de]", "eval.mask_fill.spoken_locales=[en-US,de-DE]",
            "eval.mask_fill.max_sentences_per_lang=4", "eval.mask_fill.max_utterances_per_locale=4",
            "eval.xnli.languages=[en,de]", "trainer.max_steps=4",
            "data.loader.workers=1", "data.loader.prefetch=2"]  # a loader process (the config's 4 cost 2 cores 2.5 min)
# conf/experiment/alexatm_gpu.yaml's jobs (alexatm_mini's): 8 evaluations and 15 fine-tunings (10 full, 5
# zero-shot); the fine-tuning baseline of ft_final is the run of ft_stage2_l, found by its config hash
JOB_RUNS = {"evaluate": 8, "finetune": 15}
INPUT_RUNS = {"train_tokenizer": 1, "pretrain_stage1": 3, "pretrain_stage2": 3, "distill_intermediate": 1,
              "distill_final": 1}


@pytest.mark.slow
def test_every_job_of_the_gpu_configuration_runs_on_cpu(tmp_path: Path, data_env):
    result = atm_train([*TINY_GPU, "-m"], tmp_path, data_env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = finished_runs_by_stage(tmp_path)  # every run FINISHED
    assert {stage: len(found) for stage, found in runs.items()} == {**INPUT_RUNS, **JOB_RUNS}
    models = {stage: sorted(r.data.params["model.name"] for r in runs[stage]) for stage in INPUT_RUNS
              if stage != "train_tokenizer"}
    assert models == {"pretrain_stage1": ["teacher_tiny", "teacher_tiny_m", "teacher_tiny_s"],
                      "pretrain_stage2": ["teacher_tiny", "teacher_tiny_m", "teacher_tiny_s"],
                      "distill_intermediate": ["intermediate_tiny"], "distill_final": ["student_tiny"]}
    for stage in [*models, "finetune"]:  # the GPU configuration's settings reached every training run
        for run in runs[stage]:
            assert run.data.tags["atm.precision"] == "bf16", (stage, run.info.run_name)
            assert (run.data.params["trainer.device"], run.data.params["trainer.lr"]) == ("cpu", "0.0001")
            assert run.data.params["data.loader.workers"] == "1"  # the MLM stages read batches through it
    assert {r.data.params["tokenizer.vocab_size"] for rs in runs.values() for r in rs} == {"2000"}
    evaluated = {r.data.tags["atm.input.target"] for r in runs["evaluate"]}
    assert evaluated == {r.info.run_id for stage in models for r in runs[stage]}  # every model, once
    student_ft = next(r for r in runs["finetune"] if "atm.baseline_run_id" in r.data.tags)
    assert student_ft.data.tags["atm.input.encoder"] == runs["distill_final"][0].info.run_id
