"""The bad-input battery (issue 14): every case is a real ``python -m atm.train`` subprocess that must exit with
status 2 and print exactly one non-empty line on stderr (``error: ...``, no traceback) naming the culprit, and
leave the store consistent: no MLflow run at all (every case fails before a run starts), no partial file in the
data or artifact cache.

The cases run concurrently (a small thread pool, one working directory each) in a module fixture; each case is
then one parametrized test reading its result. Known library noise ignored on stderr: none, except MLflow's own
INFO lines about creating its database tables for the cases that must read the tracking store (``runs:/<id>``).
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO

# (case id, command-line arguments, a substring the one error line must contain). ``{empty}`` is replaced by an
# empty directory (not a checkpoint).
CASES: list[tuple[str, list[str], str]] = [
    # the tracebacks and the silent success
    ("max_steps_negative", ["stage=pretrain_stage1", "trainer.max_steps=-5"], "trainer.max_steps=-5"),
    ("max_steps_not_int", ["stage=pretrain_stage1", "trainer.max_steps=abc"], "trainer.max_steps='abc'"),
    ("lr_negative", ["stage=finetune", "trainer.lr=-0.001"], "trainer.lr=-0.001"),
    ("batch_size_zero", ["stage=finetune", "trainer.batch_size=0"], "trainer.batch_size=0"),
    ("max_seq_len_one", ["stage=finetune", "data.max_seq_len=1"], "data.max_seq_len=1"),
    ("evaluate_a_tokenizer", ["stage=evaluate", "target=train_tokenizer"], "target=train_tokenizer"),
    # Hydra: unknown group option / sweep / key
    ("model_unknown", ["model=doesnotexist"], "unknown model 'doesnotexist' (available model options:"),
    ("sweep_unknown", ["-m", "+sweep=nonexistent"], "unknown sweep 'nonexistent' (available sweep options:"),
    ("trainer_key_unknown", ["trainer.bogus_key=1"], "unknown config key 'trainer.bogus_key' (keys of 'trainer':"),
    ("top_key_unknown", ["foo=1"], "unknown config key 'foo'"),
    ("stage_unknown", ["stage=nonexistent"], "unknown stage 'nonexistent'"),
    ("trainer_group_unknown", ["trainer=nope"], "unknown trainer 'nope'"),
    ("data_group_unknown", ["data=nope"], "unknown data 'nope'"),
    ("distill_group_unknown", ["distill=nope"], "unknown distill 'nope'"),
    ("augment_group_unknown", ["augment=nope"], "unknown augment 'nope'"),
    ("finetune_group_unknown", ["finetune=nope"], "unknown finetune 'nope'"),
    ("eval_group_unknown", ["eval=nope"], "unknown eval 'nope'"),
    ("tracking_group_unknown", ["tracking=nope"], "unknown tracking 'nope'"),
    ("tokenizer_group_unknown", ["tokenizer=nope"], "unknown tokenizer 'nope'"),
    ("cost_group_unknown", ["cost=nope"], "unknown cost 'nope'"),
    ("experiment_unknown", ["+experiment=nope"], "unknown experiment 'nope'"),
    ("override_unparsable", ["trainer.lr=choice()"], "cannot parse override"),
    # trainer values
    ("weight_decay_negative", ["stage=finetune", "trainer.weight_decay=-1"], "trainer.weight_decay=-1"),
    ("warmup_negative", ["stage=finetune", "trainer.warmup_steps=-1"], "trainer.warmup_steps=-1"),
    ("grad_clip_negative", ["stage=finetune", "trainer.grad_clip=-1"], "trainer.grad_clip=-1"),
    ("log_every_zero", ["stage=finetune", "trainer.log_every=0"], "trainer.log_every=0"),
    ("save_every_zero", ["stage=pretrain_stage1", "trainer.save_every=0"], "trainer.save_every=0"),
    ("keep_last_zero", ["stage=pretrain_stage1", "trainer.keep_last=0"], "trainer.keep_last=0"),
    ("grad_accum_zero", ["stage=finetune", "trainer.grad_accum_steps=0"], "trainer.grad_accum_steps=0"),
    ("device_unknown", ["stage=finetune", "trainer.device=tpu"], "trainer.device='tpu'"),
    ("precision_unknown", ["stage=finetune", "trainer.precision=fp8"], "trainer.precision='fp8'"),
    ("schedule_unknown", ["stage=finetune", "trainer.schedule=cosine"], "trainer.schedule='cosine'"),
    # stage settings
    ("mlm_probability_above_one", ["stage=pretrain_stage1", "stage.mlm_probability=1.5"], "stage.mlm_probability=1.5"),
    ("corpus_unknown", ["stage=pretrain_stage2", "stage.corpus=tweets"], "stage.corpus='tweets'"),
    ("vocab_size_zero", ["stage=train_tokenizer", "tokenizer.vocab_size=0"], "tokenizer.vocab_size=0"),
    ("coverage_above_one", ["stage=train_tokenizer", "tokenizer.character_coverage=2"],
     "tokenizer.character_coverage=2"),
    ("finetune_locale_unknown", ["stage=finetune", "finetune.locales=[xx-XX]"], "unknown MASSIVE locale(s) xx-XX"),
    ("distill_task_locale_unknown", ["stage=distill_task", "finetune.locales=[xx-XX]"],
     "unknown MASSIVE locale(s) xx-XX"),
    ("finetune_seeds_empty", ["stage=finetune", "finetune.seeds=[]"], "finetune.seeds"),
    ("intermediate_loss_unknown", ["stage=distill_final", "distill.intermediate.loss=nope"],
     "distill.intermediate.loss='nope'"),
    ("temperature_zero", ["stage=distill_final", "distill.logit.temperature=0"], "distill.logit.temperature=0"),
    ("switch_criterion_unknown", ["stage=distill_intermediate", "distill.switch.criterion=never"],
     "distill.switch.criterion='never'"),
    ("eval_checkpoints_unknown", ["stage=evaluate", "eval.checkpoints=some"], "eval.checkpoints='some'"),
    ("xnli_language_unknown", ["stage=evaluate", "eval.xnli.languages=[xx]"], "eval.xnli.languages"),
    ("data_mirror_missing", ["stage=train_tokenizer", "data.mirror=/nonexistent/mirror"], "data.mirror"),
    # the dry pass over the input graph: rejected before any input is trained
    ("skip_mapping_deeper_student", ["stage=distill_final", "teacher=pretrain_stage2", "model=teacher_small",
                                     "distill.intermediate.layer_mapping=skip"], "layer_mapping=skip"),
    ("teacher_not_a_checkpoint", ["stage=distill_final", "teacher={empty}"], "not a checkpoint directory"),
    ("input_stage_bad_config", ["stage=evaluate", "target=pretrain_stage1", "tokenizer.vocab_size=0"],
     "input tokenizer_run=train_tokenizer (stage train_tokenizer, trained first): tokenizer.vocab_size=0"),
    ("role_not_a_stage", ["stage=finetune", "encoder=no_such_thing"], "encoder='no_such_thing' is neither a stage"),
    ("run_unknown", ["stage=finetune", "encoder=runs:/0123456789abcdef"], "encoder=runs:/0123456789abcdef: no such"),
]

MLFLOW_INFO = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow\.")


def _run(case: tuple[str, list[str], str], root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    name, args, _ = case
    cwd = root / name
    cwd.mkdir()
    (cwd / "empty").mkdir()
    args = [a.replace("{empty}", str(cwd / "empty")) for a in args]
    return subprocess.run([sys.executable, "-m", "atm.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_env) -> dict[str, subprocess.CompletedProcess]:
    """Every case run once, two at a time."""
    root = tmp_path_factory.mktemp("bad-inputs")
    env = {**data_env, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        done = dict(zip((c[0] for c in CASES), pool.map(lambda c: _run(c, root, env), CASES)))
    done["_root"] = root
    return done


def _store_consistent(cwd: Path) -> None:
    """No MLflow run was started (none RUNNING, none FINISHED), and no partial file is left in the caches."""
    db = cwd / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            runs = con.execute("SELECT run_uuid, status FROM runs").fetchall()
        assert runs == [], f"a bad input left runs: {runs}"
    partial = [p for p in cwd.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.endswith((".part", ".partial")))]
    assert partial == [], partial


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(results, case):
    name, args, expected = case
    result = results[name]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and not MLFLOW_INFO.match(ln)]
    assert result.returncode == 2, (args, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1, (args, lines)
    assert lines[0].startswith("error: "), lines
    assert expected in lines[0], (expected, lines[0])
    _store_consistent(results["_root"] / name)


def test_battery_size():
    """The issue asks for at least 40 cases."""
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    assert REPO.is_dir()
