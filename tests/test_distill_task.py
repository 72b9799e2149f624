"""Stage ``distill_task``: the task-distillation loss on tiny random joint models (hand-combined parts,
first-sub-token slot positions, T^2 scaling, temperature schedule), the config checks, and the whole chain
through the real CLI (tokenizer -> ... -> finetune teacher -> task student) on real data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, atm_train, trained_store
from omegaconf import OmegaConf

from atm.errors import AtmError
from atm.lineage import CONF_DIR, compose_stage
from atm.models.heads import IGNORE_INDEX, JointIntentSlotConfig, JointIntentSlotModel
from atm.stages.distill_task import (
    TaskDistillationLoss,
    check,
    check_same_tokenizer,
    teacher_label_inventory,
)

INTENTS = ["alarm_set", "play_music", "weather_query", "iot_hue_lightoff"]
SLOTS = ["O", "B-time", "I-time", "B-song", "I-song"]
VOCAB = 50


def _joint(hidden: int, layers: int, seed: int, slot_loss_coef: float = 1.0, **labels) -> JointIntentSlotModel:
    torch.manual_seed(seed)
    config = JointIntentSlotConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=40,
                                   intent_labels=labels.get("intents", INTENTS), slot_labels=labels.get("slots", SLOTS),
                                   slot_loss_coef=slot_loss_coef, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
    return JointIntentSlotModel(config).eval()


def _distill_cfg(**overrides):
    cfg = OmegaConf.load(CONF_DIR / "distill" / "default.yaml")
    cfg.intermediate.loss = None
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def models():
    return _joint(16, 2, seed=0), _joint(8, 1, seed=1, slot_loss_coef=0.5)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, VOCAB, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0
    input_ids[2, 6:] = 1
    slot_labels = torch.full_like(input_ids, IGNORE_INDEX)
    # first sub-tokens of words; <s>, continuation sub-tokens, </s> and padding stay -100
    for row, cols in enumerate([[1, 2, 4, 7], [1, 3], [1, 2, 3, 4]]):
        slot_labels[row, cols] = torch.randint(0, len(SLOTS), (len(cols),), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "intent_labels": torch.tensor([0, 3, 1]), "slot_labels": slot_labels}


def _outputs(models, batch):
    teacher, student = models
    with torch.no_grad():
        out_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    out_s = student(**batch)
    return out_s, out_t


def _kl(z_s, z_t, t):
    return F.kl_div(F.log_softmax(z_s / t, -1), F.log_softmax(z_t / t, -1), log_target=True,
                    reduction="batchmean")


def test_total_is_hand_combined_parts(models, batch):
    teacher, student = models
    cfg = _distill_cfg(**{"hard_weight": 0.7, "logit.weight": 0.3, "logit.loss": "kl", "logit.temperature": 2.0,
                          "logit.t_squared": True})
    loss = TaskDistillationLoss(cfg, teacher.config, student.config, max_steps=10)
    out_s, out_t = _outputs(models, batch)
    total, parts = loss(out_s, out_t, batch["slot_labels"], step=3)

    labels = batch["slot_labels"]
    keep = labels != IGNORE_INDEX
    intent_ce = F.cross_entropy(out_s.intent_logits, batch["intent_labels"])
    slot_ce = F.cross_entropy(out_s.slot_logits[keep], labels[keep])
    hard = intent_ce + 0.5 * slot_ce  # the student's slot_loss_coef
    intent_kl = _kl(out_s.intent_logits, out_t.intent_logits, 2.0)
    slot_kl = _kl(out_s.slot_logits[keep], out_t.slot_logits[keep], 2.0)  # 14 first sub-tokens, mean over them
    expected = 0.7 * hard + 0.3 * 4.0 * (intent_kl + slot_kl)
    assert torch.allclose(total, expected, atol=1e-6)
    assert parts["hard"] == pytest.approx(float(hard.detach()), abs=1e-6)
    assert parts["intent_ce"] == pytest.approx(float(intent_ce.detach()), abs=1e-6)
    assert parts["slot_ce"] == pytest.approx(float(slot_ce.detach()), abs=1e-6)
    assert parts["intent_kl"] == pytest.approx(float(intent_kl.detach()), abs=1e-6)
    assert parts["slot_kl"] == pytest.approx(float(slot_kl.detach()), abs=1e-6)
    assert parts["temperature"] == 2.0
    total.backward()
    assert student.intent_classifier.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


def test_slot_distillation_only_on_first_subtokens(models, batch):
    teacher, student = models
    cfg = _distill_cfg(**{"hard_weight": 0.0, "logit.loss": "soft_ce"})
    loss = TaskDistillationLoss(cfg, teacher.config, student.config)
    out_s, out_t = _outputs(models, batch)
    labels = batch["slot_labels"]
    ignored = labels == IGNORE_INDEX
    base, _ = loss(out_s, out_t, labels)
    # teacher logits elsewhere (special tokens, continuation sub-tokens, padding) do not matter ...
    noisy = out_t.slot_logits.clone()
    noisy[ignored] += 100.0 * torch.randn_like(noisy[ignored])
    out_t2 = type(out_t)(intent_logits=out_t.intent_logits, slot_logits=noisy)
    assert torch.allclose(loss(out_s, out_t2, labels)[0], base)
    # ... those at a labelled first sub-token do
    moved = out_t.slot_logits.clone()
    moved[0, 1] += torch.arange(len(SLOTS), dtype=moved.dtype)
    out_t3 = type(out_t)(intent_logits=out_t.intent_logits, slot_logits=moved)
    assert not torch.allclose(loss(out_s, out_t3, labels)[0], base)
    # and the student gets no slot gradient off those positions
    out_s.slot_logits.retain_grad()
    base.backward()
    grad = out_s.slot_logits.grad
    assert torch.count_nonzero(grad[ignored]) == 0
    assert torch.count_nonzero(grad[~ignored]) > 0
    student.zero_grad(set_to_none=True)


def test_t_squared_scaling_and_schedule(models, batch):
    teacher, student = models
    out_s, out_t = _outputs(models, batch)
    labels = batch["slot_labels"]
    values = {}
    for t_squared in (True, False):
        cfg = _distill_cfg(**{"logit.temperature": 3.0, "logit.t_squared": t_squared})
        total, parts = TaskDistillationLoss(cfg, teacher.config, student.config)(out_s, out_t, labels)
        values[t_squared] = float(total.detach()) - parts["hard"]
        assert values[t_squared] == pytest.approx((9.0 if t_squared else 1.0)
                                                  * (parts["intent_soft_ce"] + parts["slot_soft_ce"]), rel=1e-5)
    assert values[True] == pytest.approx(9.0 * values[False], rel=1e-5)
    # the linear schedule of DistillationObjective: T from 4 to 1 over 10 steps
    cfg = _distill_cfg(**{"logit.temperature": 4.0, "logit.temperature_end": 1.0})
    loss = TaskDistillationLoss(cfg, teacher.config, student.config, max_steps=10)
    assert [loss.temperature(s) for s in (0, 5, 10, 20)] == [4.0, 2.5, 1.0, 1.0]
    assert loss(out_s, out_t, labels, step=5)[1]["temperature"] == 2.5


def test_no_logit_loss_and_no_labelled_slot(models, batch):
    teacher, student = models
    out_s, out_t = _outputs(models, batch)
    total, parts = TaskDistillationLoss(_distill_cfg(**{"logit.loss": None}), teacher.config,
                                        student.config)(out_s, out_t, batch["slot_labels"])
    assert torch.allclose(total, out_s.loss) and set(parts) == {"hard", "intent_ce", "slot_ce"}
    empty = torch.full_like(batch["slot_labels"], IGNORE_INDEX)
    out_s = models[1](**{**batch, "slot_labels": empty})
    total, parts = TaskDistillationLoss(_distill_cfg(), teacher.config, student.config)(out_s, out_t, empty)
    assert math.isfinite(float(total.detach())) and parts["slot_soft_ce"] == 0.0


def test_label_and_tokenizer_checks(models):
    teacher, student = models
    other = _joint(8, 1, seed=2, slots=["O", "B-time", "I-time", "B-song", "I-song", "B-date", "I-date"])
    with pytest.raises(AtmError, match="slot_labels differ"):
        TaskDistillationLoss(_distill_cfg(), teacher.config, other.config)
    assert teacher_label_inventory(teacher.config, sorted(INTENTS), SLOTS) == (INTENTS, SLOTS)
    with pytest.raises(AtmError, match="student's intent labels would differ from the teacher's.*not in the "
                                       "teacher: cooking_recipe"):
        teacher_label_inventory(teacher.config, [*INTENTS, "cooking_recipe"], SLOTS)

    class Tok:
        def __init__(self, n):
            self.vocab = {f"t{i}": i for i in range(n)}

        def __len__(self):
            return len(self.vocab)

        def get_vocab(self):
            return self.vocab

    check_same_tokenizer(Tok(VOCAB), Tok(VOCAB), teacher.config, student.config)
    small = _joint(8, 1, seed=3)
    small.config.vocab_size = 40
    with pytest.raises(AtmError, match=r"teacher \(teacher, vocabulary 50\) and encoder \(encoder, vocabulary 40\) "
                                       r"do not share a tokenizer"):
        check_same_tokenizer(Tok(VOCAB), Tok(40), teacher.config, small.config)


def test_stage_config_and_check():
    cfg = compose_stage("distill_task", [])
    assert list(cfg.stage.inputs) == ["teacher", "encoder"]
    assert (cfg.teacher, cfg.encoder, cfg.stage.objective) == ("finetune", "distill_final",
                                                               "eval/massive/avg/exact_match")
    assert cfg.distill.intermediate.loss is None and cfg.distill.logit.loss == "soft_ce"
    check(cfg)
    cfg.distill.intermediate.loss = "hidden_mse"
    with pytest.raises(AtmError, match="logit distillation only; set distill.intermediate.loss=null"):
        check(cfg)
    cfg.distill.intermediate.loss = None
    cfg.distill.logit.loss = "hidden_mse"
    with pytest.raises(AtmError, match="distill.logit.loss='hidden_mse' is not a known logit loss"):
        check(cfg)
    cfg.distill.logit.loss = "kl"
    cfg.distill.logit.temperature = 0
    with pytest.raises(AtmError, match="distill.logit.temperature=0 must be > 0"):
        check(cfg)


# ------------------------------------------------------------------------------------------------ CLI

# the fine-tuned teacher is trained by lineage: let it inherit the tiny finetune.* overrides too
CLI = [a if not a.startswith("lineage.inherit=") else "lineage.inherit=[lineage,data,tokenizer,tracking,trainer,eval,"
       "finetune]" for a in TINY]


@pytest.fixture(scope="module")
def task_store(tmp_path_factory, data_env):
    return trained_store(tmp_path_factory, data_env, "distill_task", ["stage=distill_task", *CLI])


def _runs(cwd: Path, stage: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("atm")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`atm.stage` = '{stage}'")


def test_cli_trains_chain_and_student(task_store):
    chain = ["train_tokenizer", "pretrain_stage1", "pretrain_stage2", "distill_intermediate", "distill_final",
             "finetune", "distill_task"]
    runs = {stage: _runs(task_store, stage) for stage in chain}
    assert {stage: len(r) for stage, r in runs.items()} == {stage: 1 for stage in chain}
    run, teacher, final = runs["distill_task"][0], runs["finetune"][0], runs["distill_final"][0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["atm.input.teacher"] == teacher.info.run_id
    assert run.data.tags["atm.input.encoder"] == final.info.run_id
    m = run.data.metrics
    for prefix in ("eval/massive/en-US", "eval/massive/avg", "eval/massive_teacher/en-US", "eval/massive_teacher/avg"):
        for key in ("intent_accuracy", "slot_f1", "exact_match"):
            assert 0.0 <= m[f"{prefix}/{key}"] <= 1.0, (prefix, key)
    em_s, em_t = m["eval/massive/avg/exact_match"], m["eval/massive_teacher/avg/exact_match"]
    ratio = m["eval/massive/avg/exact_match_ratio"]
    assert math.isnan(ratio) if em_t == 0 else ratio == pytest.approx(em_s / em_t)
    # the teacher's scores on the same examples are those its own finetune run logged
    assert em_t == pytest.approx(teacher.data.metrics["eval/massive/avg/exact_match"])
    for key in ("train/loss", "train/hard", "train/intent_soft_ce", "train/slot_soft_ce", "train/temperature"):
        assert math.isfinite(m[key]), key
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    from atm.models.heads import load_joint_model

    uri = f"sqlite:///{task_store / 'mlflow.db'}"
    student, teacher_model = (
        load_joint_model(download_artifacts(artifact_uri=MlflowClient(uri).get_logged_model(
            r.data.tags["atm.model_id"]).artifact_location, dst_path=str(task_store / "dl" / r.info.run_id)))
        for r in (run, teacher))
    assert student.config.num_hidden_layers == int(final.data.params["model.num_hidden_layers"])
    assert student.config.intent_labels == teacher_model.config.intent_labels
    assert student.config.slot_labels == teacher_model.config.slot_labels


@pytest.mark.parametrize("args,message", [
    (["distill.logit.loss=nope"], "distill.logit.loss='nope' is not a known logit loss"),
    (["distill.intermediate.loss=hidden_mse"], "set distill.intermediate.loss=null"),
])
def test_cli_bad_config_one_line_error(task_store, data_env, args, message):
    result = atm_train(["stage=distill_task", *args, *CLI], task_store, data_env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
