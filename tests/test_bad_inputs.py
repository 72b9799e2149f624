"""The bad-input battery (issue 14): every case is a real ``python -m atm.train`` subprocess (or an
``analysis/<name>.py`` script, or ``python -m atm.sweeps.report`` / ``python -m atm.sweeps.register``) that must exit with
status 2 and print exactly one non-empty line on stderr (``error: ...``, no traceback) naming the culprit, and
leave the store consistent: no MLflow run at all (every case fails before a run starts), no partial file in the
data or artifact cache.

The cases run in a module fixture (one working directory each), as forked children of two drivers side by side
(:mod:`tests.cli_driver`: the interpreter start and the stage registry import are paid once per driver, not per
case); each case is then one parametrized test reading its result. Known library noise ignored on stderr: none, except MLflow's own
INFO lines about creating its database tables for the cases that must read the tracking store (``runs:/<id>``).
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli_driver import Job, run_forked, run_plain, split
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
    # your own corpora (issue 12): checked before the tokenizer (an input) or anything else runs
    ("corpus_glob_matches_nothing", ["stage=pretrain_stage1", "data.written.paths=[nowhere/*.txt.gz]"],
     "data.written.paths[0]='nowhere/*.txt.gz' matches no file"),
    ("corpus_paths_not_a_list", ["stage=pretrain_stage2", "data.spoken.paths=corpus.txt"],
     "data.spoken.paths='corpus.txt' must be a list of globs"),
    ("loader_workers_negative", ["stage=pretrain_stage1", "data.loader.workers=-1"], "data.loader.workers=-1"),
    ("shard_workers_zero", ["stage=distill_final", "data.shards.workers=0"], "data.shards.workers=0"),
    ("system_metrics_interval_zero", ["stage=train_tokenizer", "tracking.system_metrics_interval=0"],
     "tracking.system_metrics_interval=0"),
    ("system_metrics_not_bool", ["stage=train_tokenizer", "tracking.system_metrics=sometimes"],
     "tracking.system_metrics='sometimes'"),
    # tracking.register_best: a registered model name, for a single-objective sweep (the sweeper checks it first)
    ("register_best_not_a_sweep", ["stage=train_tokenizer", "tracking.register_best=teacher"],
     "tracking.register_best=teacher registers the best trial of a sweep"),
    ("register_best_bad_name", ["-m", "+sweep=bench_pruning", "tracking.register_best=a/b"],
     "tracking.register_best='a/b' must not contain '/' or ':'"),
    ("register_best_multi_objective", ["-m", "+sweep=student_cost", "tracking.register_best=student"],
     "tracking.register_best=student: a sweep with 2 objectives has no single best trial"),
    # the dry pass over the input graph: rejected before any input is trained
    ("skip_mapping_deeper_student", ["stage=distill_final", "teacher=pretrain_stage2", "model=teacher_small",
                                     "distill.intermediate.layer_mapping=skip"], "layer_mapping=skip"),
    ("teacher_not_a_checkpoint", ["stage=distill_final", "teacher={empty}"], "not a checkpoint directory"),
    ("input_stage_bad_config", ["stage=evaluate", "target=pretrain_stage1", "tokenizer.vocab_size=0"],
     "input tokenizer_run=train_tokenizer (stage train_tokenizer, trained first): tokenizer.vocab_size=0"),
    ("role_not_a_stage", ["stage=finetune", "encoder=no_such_thing"], "encoder='no_such_thing' is neither a stage"),
    ("run_unknown", ["stage=finetune", "encoder=runs:/0123456789abcdef"], "encoder=runs:/0123456789abcdef: no such"),
    # the analysis scripts and the sweep report: usage errors and bad stores are one line too
    ("analysis_option_unknown", ["analysis/correlate_xnli.py", "--bogus"], "unrecognized arguments: --bogus"),
    ("analysis_option_without_value", ["analysis/stage2_effect.py", "--run-id"],
     "argument --run-id: expected at least one argument"),
    ("analysis_int_option_not_int", ["analysis/ablation_report.py", "--bins", "many"],
     "argument --bins: invalid int value: 'many'"),
    ("analysis_choice_unknown", ["analysis/autodistiller.py", "--model", "forest"], "argument --model: invalid choice"),
    ("analysis_store_missing", ["analysis/distillation_table.py", "--tracking-uri", "sqlite:///{empty}/mlflow.db"],
     "no MLflow store at"),
    ("analysis_value_out_of_range", ["analysis/autodistiller.py", "--k", "0"], "--k 0 must be >= 1"),
    ("analysis_run_id_refused", ["analysis/findings.py", "--run-id", "abc"], "--run-id is not supported"),
    ("baseline_locale_unknown", ["analysis/baseline_tfidf.py", "--locale", "xx-XX"], "xx-XX"),
    ("sweep_report_study_missing", ["module:atm.sweeps.report"], "the following arguments are required: study"),
    ("register_name_missing", ["module:atm.sweeps.register", "--study", "s"],
     "the following arguments are required: --name"),
    ("register_store_missing", ["module:atm.sweeps.register", "--run", "0123", "--name", "m", "--tracking-uri",
                                "sqlite:///{empty}/mlflow.db"], "no MLflow store at"),
    ("sweep_report_storage_missing", ["module:atm.sweeps.report", "s", "--storage", "sqlite:///{empty}/optuna.db"],
     "no Optuna storage at"),
]

MLFLOW_INFO = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow\.")


def _job(case: tuple[str, list[str], str], root: Path) -> Job:
    name, args, _ = case
    cwd = root / name
    (cwd / "empty").mkdir(parents=True)
    args = [a.replace("{empty}", str(cwd / "empty")) for a in args]
    if args[0].endswith(".py"):  # an analysis script, run as its docs say (python analysis/<name>.py)
        return Job(args[1:], str(cwd), script=str(REPO / args[0]))
    if args[0].startswith("module:"):  # another module's CLI
        return Job(args[1:], str(cwd), module=args[0].removeprefix("module:"))
    return Job(args, str(cwd))


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_env) -> dict[str, subprocess.CompletedProcess]:
    """Every case run once: forked children of two drivers side by side (:mod:`tests.cli_driver`); the first
    case also as a plain subprocess, which must give the same exit status and stderr."""
    root = tmp_path_factory.mktemp("bad-inputs")
    env = {**data_env, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    jobs = [_job(c, root) for c in CASES]
    twin = _job(CASES[0], root / "_plain")
    parts = split(list(range(len(jobs))), min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=len(parts) + 1) as pool:
        plain = pool.submit(run_plain, twin, env, 600)
        forked = list(pool.map(lambda ix: run_forked([jobs[i] for i in ix[1]], root / f"_driver{ix[0]}", env),
                               enumerate(parts)))
    done = {CASES[i][0]: r for ix, rs in zip(parts, forked) for i, r in zip(ix, rs)}
    done["_plain"] = plain.result()
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


def test_a_forked_case_is_the_plain_command(results):
    """The battery's forked children behave as ``python -m atm.train`` started afresh."""
    plain, forked = results["_plain"], results[CASES[0][0]]
    assert (plain.returncode, plain.stderr.strip()) == (forked.returncode, forked.stderr.strip())


def test_battery_size():
    """The issue asks for at least 40 cases."""
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    assert REPO.is_dir()
