"""The stage registry (atm.stages.registry): names, aliases, kinds, errors, stages declared outside atm; and a toy
stage module + config written into a temporary directory, run through the real CLI (``python -m atm.train``)
with a toy consumer whose input lineage trains first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from atm.errors import AtmError
from atm.stages import all_stages, canonical_name, get_stage, registry, stage, stage_of, stages_of_kind

REPO = Path(__file__).resolve().parents[1]
PIPELINE = ("train_tokenizer", "pretrain_stage1", "pretrain_stage2", "distill_intermediate", "distill_final",
            "finetune", "distill_task", "finetune_xnli", "evaluate")


@pytest.fixture
def scratch(monkeypatch):
    """A copy of the registry (built-in stages discovered) that the test may add to; restored afterwards."""
    all_stages()
    copy = registry.Registry()
    copy.stages.update(registry._REGISTRY.stages)
    copy.aliases.update(registry._REGISTRY.aliases)
    monkeypatch.setattr(registry, "_REGISTRY", copy)
    return copy


def _noop(cfg, inputs):
    return {}


# ------------------------------------------------------------------------------------------ built-in stages


def test_built_in_stages_in_pipeline_order():
    assert tuple(all_stages()) == PIPELINE
    assert stages_of_kind("mlm") == ("pretrain_stage1", "pretrain_stage2", "distill_intermediate", "distill_final")
    assert stages_of_kind("teacher") == ("pretrain_stage1", "pretrain_stage2")
    assert stages_of_kind("classifier:massive") == ("finetune",)
    assert stages_of_kind("classifier:xnli") == ("finetune_xnli",)
    assert stages_of_kind("nothing") == ()


def test_order_does_not_depend_on_what_was_imported_first(tmp_path):
    """A stage module imported before the registry is read (here: evaluate, then distill) changes no listing."""
    code = ("import atm.stages.evaluate, atm.stages.distill\nfrom atm.stages import all_stages, stages_of_kind\n"
            "print(','.join(all_stages())); print(','.join(stages_of_kind('mlm')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    listed, mlm = out.stdout.split()
    assert tuple(listed.split(",")) == PIPELINE and mlm.split(",") == list(stages_of_kind("mlm"))


def test_aliases():
    aliases = {"stage1": "pretrain_stage1", "stage2": "pretrain_stage2", "intermediate": "distill_intermediate",
               "final": "distill_final", "tokenizer": "train_tokenizer"}
    for alias, name in aliases.items():
        assert canonical_name(alias) == name
        assert get_stage(alias) is get_stage(name)
        assert get_stage(name).aliases == (alias,)
    assert canonical_name("finetune") == "finetune" and canonical_name("not/a/stage") == "not/a/stage"
    assert get_stage("evaluate").aliases == ()


def test_attributes_of_built_in_stages():
    evaluate, tokenizer, s1, s2 = (get_stage(n) for n in ("evaluate", "train_tokenizer", "stage1", "stage2"))
    assert evaluate.artifact == "evaluation" and tokenizer.artifact == "tokenizer" and s1.artifact == "checkpoint"
    assert s1.run is s2.run and s1.check is s2.check and s1.reads == s2.reads == ("model", "trainer", "data")
    assert s1.module == "atm.stages.pretrain" and tokenizer.check.__module__ == "atm.stages.tokenizer"
    cfg = OmegaConf.create({"stage": {"inputs": ["init"], "optional_inputs": ["extra"]}})
    assert s2.hashed_keys(cfg) == ("stage", "seed", "model", "trainer", "data", "init", "extra")


def test_unknown_stage_names_the_known_ones():
    with pytest.raises(AtmError) as err:
        get_stage("nope")
    assert str(err.value) == f"unknown stage 'nope' (known: {', '.join(PIPELINE)})"


# ------------------------------------------------------------------------------------------ registering


def test_duplicate_registration_is_an_error(scratch):
    with pytest.raises(AtmError, match="stage 'finetune' registered twice"):
        stage("finetune")(_noop)
    with pytest.raises(AtmError, match="stage alias 'stage2' of mine is already taken by stage pretrain_stage2"):
        stage("mine", aliases=("stage2",))(_noop)
    with pytest.raises(AtmError, match="stage alias 'evaluate' of mine2 is already taken by stage evaluate"):
        stage("mine2", aliases=("evaluate",))(_noop)
    with pytest.raises(AtmError, match="stage 'final' is already an alias of stage distill_final"):
        stage("final")(_noop)
    assert "mine" not in all_stages() and "final" not in all_stages()


def test_declaring_the_same_function_again_replaces_it(scratch):
    stage("mine", aliases=("m",))(_noop)
    stage("mine", aliases=("m",))(_noop)  # the module imported twice
    assert get_stage("m").run is _noop and tuple(all_stages())[-1] == "mine"


def test_bad_declarations():
    with pytest.raises(AtmError, match="needs at least one stage name"):
        stage()
    with pytest.raises(AtmError, match="artifact='weights' must be one of checkpoint, tokenizer, evaluation"):
        stage("x", artifact="weights")
    with pytest.raises(AtmError, match=r"give aliases as a mapping \{alias: stage name\}"):
        stage("x", "y", aliases=("z",))
    with pytest.raises(AtmError, match="names 'w', not one of the stages declared: x, y"):
        stage("x", "y", aliases={"z": "w"})


def test_several_names_one_function(scratch):
    stage("a_one", "a_two", reads=("data",), aliases={"one": "a_one"}, kinds=("toy",))(_noop)
    assert get_stage("one").name == "a_one" and get_stage("a_two").aliases == ()
    assert get_stage("a_one").run is get_stage("a_two").run is _noop
    assert stages_of_kind("toy") == ("a_one", "a_two")
    assert tuple(all_stages())[:len(PIPELINE)] == PIPELINE  # stages declared outside atm come after the built-ins


def test_stage_of_imports_the_configured_module(scratch, tmp_path, monkeypatch):
    (tmp_path / "atm_toy_registry_mod.py").write_text(textwrap.dedent("""
        from atm.stages import stage

        @stage("toy_registered", reads=("data",), artifact="evaluation", kinds=("toy",))
        def run(cfg, inputs):
            return {"toy/value": 1.0}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    found = stage_of(OmegaConf.create({"stage": {"name": "toy_registered", "module": "atm_toy_registry_mod"}}))
    assert found.name == "toy_registered" and found.module == "atm_toy_registry_mod" and found.run(None, {})
    assert stage_of(OmegaConf.create({"stage": {"name": "stage1"}})).name == "pretrain_stage1"
    with pytest.raises(AtmError, match="stage.module=no_such_module_xyz: cannot import it"):
        stage_of(OmegaConf.create({"stage": {"name": "toy", "module": "no_such_module_xyz"}}))
    with pytest.raises(AtmError, match="unknown stage 'other'"):
        stage_of(OmegaConf.create({"stage": {"name": "other", "module": "atm_toy_registry_mod"}}))


def test_cli_stage_argument(tmp_path):
    from atm.train import normalise_argv

    assert normalise_argv(["stage=stage2", "-m", "seed=1"]) == ["-m", "stage=pretrain_stage2", "seed=1"]
    assert normalise_argv(["stage=final,evaluate"]) == ["stage=distill_final,evaluate"]
    with pytest.raises(AtmError, match="unknown stage 'toy_cli'"):
        normalise_argv(["stage=toy_cli"])


# ------------------------------------------------------------------------------------------ a toy stage via the CLI

TOY_PRODUCER = '''
"""A toy stage: count the lines of a file."""
from pathlib import Path

import mlflow

from atm.errors import AtmError
from atm.stages import stage


def check(cfg):
    if not Path(cfg.stage.file).is_file():
        raise AtmError(f"stage.file={cfg.stage.file}: no such file")


@stage("toy_lines", reads=("data",), artifact="evaluation", check=check, aliases=("lines",))
def run(cfg, inputs):
    lines = len(Path(cfg.stage.file).read_text().splitlines())
    mlflow.log_text(str(lines), "evaluation/lines.txt")
    metrics = {"toy/lines": float(lines)}
    mlflow.log_metrics(metrics)
    return metrics
'''

TOY_CONSUMER = '''
"""A toy stage reading the count of its ``source`` input (a toy_lines run: its ``evaluation`` artifact)."""
import mlflow

from atm.stages import stage


@stage("toy_total", reads=("data",))
def run(cfg, inputs):
    lines = int((inputs["source"].path / "lines.txt").read_text())
    metrics = {"toy/total": float(lines * cfg.stage.factor)}
    mlflow.log_metrics(metrics)
    return metrics
'''


def _toy_tree(root: Path, data_file: Path) -> Path:
    """Two toy stage modules in ``root`` (separate, so that the consumer's run finds the producer by its config
    alone) and their configs in ``root/toy_conf/stage``; returns the config directory."""
    (root / "atm_toy_producer.py").write_text(TOY_PRODUCER)
    (root / "atm_toy_consumer.py").write_text(TOY_CONSUMER)
    conf = root / "toy_conf"
    (conf / "stage").mkdir(parents=True)
    (conf / "stage" / "toy_lines.yaml").write_text(textwrap.dedent(f"""\
        # @package _global_
        stage:
          name: toy_lines
          module: atm_toy_producer
          inputs: []
          objective: toy/lines
          file: {data_file}
        """))
    (conf / "stage" / "toy_total.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        stage:
          name: toy_total
          module: atm_toy_consumer
          inputs: [source]
          objective: toy/total
          factor: 10
        source: toy_lines
        """))
    return conf


def test_toy_stage_through_the_cli(tmp_path):
    from mlflow.tracking import MlflowClient

    data_file = tmp_path / "data.txt"
    data_file.write_text("one\ntwo\nthree\n")
    conf = _toy_tree(tmp_path, data_file)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]), "TQDM_DISABLE": "1",
           "HYDRA_FULL_ERROR": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    work = tmp_path / "work"
    work.mkdir()

    def train(*args):
        return subprocess.run([sys.executable, "-m", "atm.train", *args, f"hydra.searchpath=[file://{conf}]"],
                              cwd=work, env=env, capture_output=True, text=True, timeout=900)

    # the consumer first: lineage finds no toy_lines run and trains it (out-of-tree stage named by its config)
    result = train("stage=toy_total")
    assert result.returncode == 0, result.stderr[-3000:]
    result = train("stage=toy_lines")  # the same config hash: a second run of the producer, by its own name
    assert result.returncode == 0, result.stderr[-3000:]
    bad = train("stage=toy_lines", f"stage.file={tmp_path / 'missing.txt'}")
    assert bad.returncode == 2 and "error: stage.file=" in bad.stderr and "Traceback" not in bad.stderr

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("atm").experiment_id], order_by=["attributes.start_time"])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["atm.stage"], []).append(run)
    assert sorted(by_stage) == ["toy_lines", "toy_total"] and len(by_stage["toy_lines"]) == 2
    producer, consumer = by_stage["toy_lines"][0], by_stage["toy_total"][0]
    assert producer.info.status == "FINISHED" and producer.data.metrics["toy/lines"] == 3.0
    assert consumer.data.metrics["toy/total"] == 30.0
    assert consumer.data.tags["atm.input.source"] == producer.info.run_id
    assert by_stage["toy_lines"][1].data.tags["atm.config_hash"] == producer.data.tags["atm.config_hash"]
