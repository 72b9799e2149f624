"""Exact resume after a crash: a real ``python -m atm.train`` subprocess killed with SIGKILL after a training
state exists, restarted with the same command, ends with the loss, perplexities and metric history of an
uninterrupted run, in the same MLflow run; corrupt or truncated states fail with one line and lose nothing."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, atm_train
from omegaconf import OmegaConf

from atm.data.collate import BatchStream
from atm.engine import state as S
from atm.engine.loop import fit
from atm.errors import AtmError

STEPS, EVERY = 40, 4


def _stage1(store: Path, experiment: str, tokenizer_run: str | None) -> list[str]:
    return ["stage=pretrain_stage1", *TINY, f"trainer.max_steps={STEPS}", f"trainer.save_every={EVERY}",
            "trainer.log_every=1", f"tracking.uri=sqlite:///{store}/mlflow.db", f"tracking.experiment={experiment}",
            *([f"tokenizer_run=runs:/{tokenizer_run}"] if tokenizer_run else [])]


def _runs(store: Path, experiment: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`atm.stage` = 'pretrain_stage1'")


def _history(client, run_id: str, key: str) -> dict[int, float]:
    """step -> value; a step retrained after the crash is logged twice and must have one value."""
    out: dict[int, float] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step in out:
            assert m.value == pytest.approx(out[m.step], rel=1e-6, abs=1e-9), (key, m.step)
        out[m.step] = m.value
    return out


def test_sigkill_then_restart_matches_uninterrupted_run(tmp_path, data_env):
    store, reference_dir, crash_dir = tmp_path, tmp_path / "reference", tmp_path / "crash"
    reference_dir.mkdir()
    crash_dir.mkdir()
    # the uninterrupted run; lineage trains its tokenizer first, which the crashed run then shares
    reference = atm_train(_stage1(store, "uninterrupted", None), reference_dir, data_env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    _, (ref,) = _runs(store, "uninterrupted")
    tokenizer_run = ref.data.tags["atm.input.tokenizer_run"]

    args = _stage1(store, "crashed", tokenizer_run)
    state_root = crash_dir / ".atm" / "cache" / "state"
    child = subprocess.Popen([sys.executable, "-m", "atm.train", *args], cwd=crash_dir, env=data_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list(state_root.glob(f"*/step-{EVERY:06d}")):
        assert child.poll() is None, f"the run ended before its first state: {child.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no training state appeared"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    (run_dir,) = state_root.iterdir()
    killed_at = S.states(run_dir)[-1][0]
    assert killed_at < STEPS, "the run finished training before SIGKILL arrived; nothing was resumed"

    client, runs = _runs(store, "crashed")
    assert [r.info.status for r in runs] == ["RUNNING"]  # SIGKILL: nobody could mark it

    restart = atm_train(args, crash_dir, data_env)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "resuming run" in restart.stdout + restart.stderr

    client, runs = _runs(store, "crashed")
    assert len(runs) == 1 and runs[0].info.run_id == run_dir.name and runs[0].info.status == "FINISHED"
    resumed_loss = _history(client, run_dir.name, "train/loss")
    reference_loss = _history(client, ref.info.run_id, "train/loss")
    assert sorted(resumed_loss) == list(range(1, STEPS + 1))  # continuous history, steps 1..40
    for step, value in reference_loss.items():
        assert resumed_loss[step] == pytest.approx(value, rel=1e-5), step
    for key in ("train/loss", "eval/perplexity/written", "eval/perplexity/spoken"):
        assert runs[0].data.metrics[key] == pytest.approx(ref.data.metrics[key], rel=1e-5), key
    assert ref.data.metrics["train/loss"] != pytest.approx(resumed_loss[1], rel=1e-3)  # it did learn
    # retention: the newest trainer.keep_last=2 states remain, the last one is the final step
    assert [s for s, _ in S.states(run_dir)] == [STEPS - EVERY, STEPS]


# ---------------------------------------------------------------- in-process: RNG-exact resume, bad states


class _Tiny(torch.nn.Module):
    """Embedding -> dropout -> classifier: dropout and random masking make resume depend on every RNG."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.drop = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, input_ids):
        return self.head(self.drop(self.embed(input_ids)).mean(1))


def _collate(items):
    ids = torch.tensor([i["input_ids"] for i in items])
    noise = torch.randint(0, 50, ids.shape)  # global torch RNG, like MLM masking
    keep = torch.rand(ids.shape) < 0.8
    return {"input_ids": torch.where(keep, ids, noise), "labels": torch.tensor([i["label"] for i in items])}


class _Crash(Exception):
    pass


def _train(tmp: Path, state_dir: Path | None, crash_at: int | None = None):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(0, 50, (6,), generator=g).tolist(), "label": i % 3} for i in range(40)]
    model = _Tiny()
    cfg = OmegaConf.create({"max_steps": 10, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.01,
                            "warmup_steps": 3, "grad_clip": 1.0, "precision": "fp32", "log_every": 2,
                            "state_every": 3, "keep_last": 2, "state_dir": str(tmp), "grad_accum_steps": 1})

    def loss_fn(batch, step):
        return torch.nn.functional.cross_entropy(model(batch["input_ids"]), batch["labels"]), {}

    def crash(step):
        if step == crash_at:
            raise _Crash

    try:
        summary = fit(model, BatchStream(examples, 8, _collate, seed=3), loss_fn, cfg, log_metrics=False,
                      state_dir=state_dir, callbacks=[crash])
    except _Crash:
        return model, None
    return model, summary


def test_fit_resumes_bit_exactly_with_dropout_and_random_collate(tmp_path):
    whole, whole_summary = _train(tmp_path, None)
    run_dir = tmp_path / "run"
    _train(tmp_path, run_dir, crash_at=8)  # a crash in step 8: states after steps 3 and 6
    assert [s for s, _ in S.states(run_dir)] == [3, 6]
    resumed, resumed_summary = _train(tmp_path, run_dir)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed_summary["train/loss"] == whole_summary["train/loss"]


@pytest.mark.parametrize("damage", ["truncate_model", "flip_trainer_byte", "drop_manifest"])
def test_corrupt_or_truncated_state_is_one_line_error_and_nothing_is_deleted(tmp_path, damage):
    run_dir = tmp_path / "run"
    _train(tmp_path, run_dir, crash_at=8)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    newest = run_dir / "step-000006"
    if damage == "truncate_model":
        path = newest / S.MODEL
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "flip_trainer_byte":
        path = newest / S.TRAINER
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path = newest / S.MANIFEST
        path.unlink()
    with pytest.raises(AtmError) as err:
        _train(tmp_path, run_dir)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "step-000003" in message
    after = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    assert after == [p for p in before if p != path.relative_to(run_dir)] or after == before
    assert (run_dir / "step-000003" / S.MANIFEST).is_file()


def test_stop_training_ends_fit_after_that_step_and_reports_the_steps_trained(tmp_path):
    from atm.engine.loop import StopTraining

    torch.manual_seed(0)
    model = _Tiny()
    seen = []
    cfg = OmegaConf.create({"max_steps": 10, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.01,
                            "warmup_steps": 3, "grad_clip": 1.0, "precision": "fp32", "log_every": 5,
                            "grad_accum_steps": 1})
    examples = [{"input_ids": [1, 2, 3, 4, 5, 6], "label": i % 3} for i in range(16)]

    def stop_at_4(step):
        if step == 4:
            raise StopTraining

    summary = fit(model, BatchStream(examples, 8, _collate, seed=3),
                  lambda batch, step: (torch.nn.functional.cross_entropy(model(batch["input_ids"]), batch["labels"]),
                                       {}),
                  cfg, log_metrics=False, callbacks=[stop_at_4, seen.append])
    assert seen == [1, 2, 3, 4]  # the callbacks after the stopping one still ran for step 4, then nothing
    assert summary["train/step"] == 4 and math.isfinite(summary["train/loss"])
