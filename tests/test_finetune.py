"""Tests of atm.stages.finetune and atm.tasks.massive: MASSIVE scores from word-level predictions (official exact
match, slot-F1 standard error by words, words without a sub-token), length-bucketed prediction, early stopping,
settings, baseline comparison, and the CLI on real data (full data with a bootstrap interval, zero-shot over a frozen
encoder with two seeds and early stopping, relative error change, one-line errors)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import atm_train
from omegaconf import OmegaConf
from seqeval.metrics import f1_score
from test_models import tok  # noqa: F401  (module fixture: a 600-piece tokenizer on real SLURP text)

from atm import metrics as M
from atm.data.massive import MassiveExample, intent_labels, parse_annot_utt, slot_labels
from atm.engine.loop import StopTraining, fit
from atm.errors import AtmError
from atm.lineage import compose_stage
from atm.models import JointIntentSlotModel, build_mlm, load_checkpoint, load_preset, save_checkpoint
from atm.models.heads import word_predictions
from atm.stages import finetune as F
from atm.tasks import massive as T

# a short real fine-tuning run: 6 steps over 48 utterances per locale, 24 test utterances per locale
FAST = ["trainer.max_steps=6", "trainer.batch_size=8", "trainer.warmup_steps=1", "trainer.log_every=3",
        "data.max_seq_len=32", "finetune.max_train_per_locale=48", "finetune.max_eval_per_locale=24"]
N_EVAL = 24


@pytest.fixture(scope="module")
def encoder_dir(tok, tmp_path_factory):  # noqa: F811
    """A tiny MLM checkpoint (student_tiny shape, untrained) given to the stages as a path input."""
    return save_checkpoint(build_mlm(load_preset("student_tiny"), tok, seed=0), tok,
                           tmp_path_factory.mktemp("encoder") / "student")


def _example(annot: str, intent: str = "alarm_set", locale: str = "en-US") -> MassiveExample:
    words, tags = parse_annot_utt(annot)
    return MassiveExample("0", locale, "test", "alarm", intent, " ".join(words), tuple(words), tuple(tags))


# ------------------------------------------------------------------------------- scores (in-process)


def _hand_tokenizer():
    from transformers import XLMRobertaTokenizer

    pieces = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "▁", "▁at", "▁am", "▁me", "s", "e", "v", "n", "f", "i"]
    return XLMRobertaTokenizer(vocab=[(p, 0.0 if i < 5 else -1.0) for i, p in enumerate(pieces)])


def test_slot_spans_across_sub_tokens_are_scored_on_first_sub_tokens():
    hand = _hand_tokenizer()
    slots = ["O", "B-time", "I-time"]
    # "seven" and "five" are not in the vocabulary: each splits into several sub-tokens
    examples = [_example("me at [time : seven am]"), _example("[time : five] me")]
    encoded = T.encode(hand, examples, ["alarm_set", "x"], slots, max_seq_len=32)
    first = encoded[0]
    assert hand.convert_ids_to_tokens(first["input_ids"]) == ["<s>", "▁me", "▁at", "▁", "s", "e", "v", "e", "n",
                                                             "▁am", "</s>"]
    # labels only on each word's first sub-token
    assert first["slot_labels"] == [-100, 0, 0, 1, -100, -100, -100, -100, -100, 2, -100]
    # token predictions: right on every first sub-token of utterance 0 but wrong on its continuation
    # sub-tokens (ignored); in utterance 1 the span "five" (5 sub-tokens) is predicted I-time on its first
    # sub-token and B-time on the others -> the word reads I-time (a lenient seqeval span, right type)
    assert hand.convert_ids_to_tokens(encoded[1]["input_ids"]) == ["<s>", "▁", "f", "i", "v", "e", "▁me", "</s>"]
    row0 = [2, 0, 0, 1, 0, 0, 2, 2, 0, 2, 0]
    row1 = [0, 2, 1, 1, 1, 1, 0, 0]
    tags = [[slots[i] for i in word_predictions(item["word_ids"], row)] for item, row in zip(encoded, (row0, row1))]
    assert tags == [["O", "O", "B-time", "I-time"], ["I-time", "O"]]
    scores = T.score_predictions(["alarm_set", "x"], tags, examples)
    gold = [list(ex.slot_tags) for ex in examples]
    assert scores["slot_f1"] == 1.0 == f1_score(gold, tags)  # both spans right (lenient IOB, as MASSIVE)
    # utterance 0 is an exact match; utterance 1 has the wrong intent (its I-time for gold B-time is the same
    # slot type: the official exact match would accept it with the right intent)
    assert scores["intent_accuracy"] == 0.5 and scores["exact_match"] == 0.5
    assert scores["intent_accuracy_se"] == scores["exact_match_se"] == pytest.approx(math.sqrt(0.5 * 0.5 / 2))
    assert scores["slot_f1_se"] == 0.0
    assert T.score_predictions(["alarm_set", "alarm_set"], tags, examples)["exact_match"] == 1.0


def test_scores_with_empty_and_all_o_utterances():
    examples = [_example("me at five"), _example("[time : five am]"),
                MassiveExample("2", "en-US", "test", "alarm", "alarm_set", "", (), ())]
    pred_tags = [["O", "O", "O"], ["B-time", "O"], []]
    scores = T.score_predictions(["alarm_set", "alarm_set", "alarm_set"], pred_tags, examples)
    # one gold span, one predicted span with the wrong boundary: F1 0; exact match: utterances 0 and 2
    assert scores["slot_f1"] == 0.0
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["exact_match_se"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert scores["intent_accuracy"] == 1.0 and scores["intent_accuracy_se"] == 0.0


def test_slot_f1_standard_error_counts_words_not_utterances():
    examples = [_example("wake me at [time : five am]"), _example("[date : today] at [time : five]")]
    pred_tags = [["O", "O", "O", "B-time", "I-time"], ["B-date", "O", "O"]]
    scores = T.score_predictions(["alarm_set"] * 2, pred_tags, examples)
    # gold spans: time, date, time; predicted: time, date -> P 1, R 2/3, F1 0.8; n = 5 + 3 words (official scorer)
    assert scores["slot_f1"] == pytest.approx(0.8) == f1_score([list(e.slot_tags) for e in examples], pred_tags)
    assert scores["slot_f1_se"] == pytest.approx(math.sqrt(0.8 * 0.2 / 8))
    assert scores["exact_match_se"] == pytest.approx(math.sqrt(0.5 * 0.5 / 2))  # exact match: n = 2 utterances


def _tiny_joint(encoder_dir, constant_slot: str | None = None):
    """A joint model over the tiny encoder; with ``constant_slot`` its slot head predicts that label everywhere."""
    model = JointIntentSlotModel.from_encoder(encoder_dir, intent_labels(), slot_labels())
    if constant_slot is not None:
        with torch.no_grad():
            model.slot_classifier.weight.zero_()
            model.slot_classifier.bias.fill_(-10.0)
            model.slot_classifier.bias[slot_labels().index(constant_slot)] = 10.0
    return model.eval()


def test_a_word_without_sub_token_is_predicted_o(real_data_env, tok, encoder_dir):  # noqa: F811
    # real test utterances with a lone zero-width space as a word: my-MM 6243 (between a date and an event
    # name) and zh-CN 14509 (two of them); the tokenizer gives those words no token
    by_id = {(ex.locale, ex.id): ex for loc, items in T.read_locales(["my-MM", "zh-CN"], "test", "k").items()
             for ex in items}
    examples = [by_id[("my-MM", "6243")], by_id[("zh-CN", "14509")]]
    assert examples[0].words[2] == "\u200b" and examples[1].words[6:8] == ("\u200b", "\u200b")
    encoded = T.encode(tok, examples, intent_labels(), slot_labels(), max_seq_len=64)
    assert 2 not in encoded[0]["word_ids"] and 6 not in encoded[1]["word_ids"] and 7 not in encoded[1]["word_ids"]
    model = _tiny_joint(encoder_dir, constant_slot="B-date")
    _, pred_tags = T.predict(model, tok, encoded, intent_labels(), slot_labels())
    # every word with a token gets the head's B-date; the zero-width words are "O" (not slots[-100], a real label)
    assert pred_tags[0] == ["B-date", "B-date", "O", "B-date", "B-date"]
    assert pred_tags[1] == ["B-date"] * 6 + ["O", "O", "B-date"]
    # so the gold "O" of those words is scored against "O": no invented span
    counts = T.example_scores(["x", "x"], pred_tags, examples)
    # (tp, fp, fn): my-MM: its date word right, 3 other B-date words spurious, the event name missed;
    # zh-CN: 7 spurious dates, the person missed
    assert counts[:, 2:].tolist() == [[1, 3, 1], [0, 7, 1]]


def test_prediction_is_in_input_order_and_independent_of_bucketing(real_data_env, tok, encoder_dir):  # noqa: F811
    examples = T.eval_examples(compose_stage("finetune", ["finetune.max_eval_per_locale=40"]).finetune)["en-US"]
    data = T.eval_set(tok, examples, intent_labels(), slot_labels(), max_seq_len=32)
    assert data.n_words == sum(len(ex.words) for ex in examples)
    lengths = [len(item["input_ids"]) for item in data.encoded]
    assert lengths != sorted(lengths)  # file order is not length order: the bucketing reorders
    model = _tiny_joint(encoder_dir)
    torch.nn.init.normal_(model.slot_classifier.weight, std=2.0, generator=torch.Generator().manual_seed(0))
    bucketed = T.predict(model, tok, data.encoded, intent_labels(), slot_labels(), batch_size=16)
    one_by_one = T.predict(model, tok, data.encoded, intent_labels(), slot_labels(), batch_size=1)
    assert bucketed == one_by_one
    assert [len(t) for t in bucketed[1]] == [len(ex.words) for ex in examples]
    assert len({tuple(t) for t in bucketed[1]}) > 1  # not a degenerate constant prediction


# ------------------------------------------------------------------------------------ early stopping


def _fit_with_early_stopping(dev_scores: list[float], every: int, patience: int, max_steps: int = 40):
    """Train a linear model with an EarlyStopping callback whose dev score at its k-th evaluation is
    ``dev_scores[k]``; returns (fit summary, callback, weights seen at each evaluated step, model)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    seen, calls = {}, []

    def evaluate(step: int) -> float:
        seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
        calls.append(step)
        return dev_scores[len(calls) - 1]

    stopper = F.EarlyStopping(model, evaluate, every=every, patience=patience, max_steps=max_steps)

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            yield {"input_ids": torch.randn(4, 3, generator=g)}

    cfg = OmegaConf.create({"max_steps": max_steps, "batch_size": 4, "lr": 0.1, "weight_decay": 0.0,
                            "warmup_steps": 0, "grad_clip": 1.0, "precision": "fp32", "log_every": 1000,
                            "backend": "torch"})
    summary = fit(model, batches(), lambda batch, step: ((model(batch["input_ids"]) - 1).pow(2).mean(), {}), cfg,
                  callbacks=[stopper], log_metrics=False)
    return summary, stopper, seen, model


def test_early_stopping_stops_after_patience_and_restores_the_best_weights():
    # evaluations at steps 3, 6, 9, 12, 15: best (0.5) at step 6, then 0.5 (a tie is no better), 0.4, 0.45
    summary, stopper, seen, model = _fit_with_early_stopping([0.1, 0.5, 0.5, 0.4, 0.45, 0.9], every=3, patience=3)
    assert list(seen) == [3, 6, 9, 12, 15]  # stopped after three evaluations without a better score
    assert summary["train/step"] == 15.0
    assert not torch.equal(model.weight, seen[6]["weight"])  # training moved the weights on after step 6
    assert stopper.restore() == 6
    for name, value in model.state_dict().items():
        assert torch.equal(value, seen[6][name]), name
    # its state resumes: a restored callback that had stopped stops at once, with the same best weights
    again = F.EarlyStopping(torch.nn.Linear(3, 1), lambda step: 0.0, every=3, patience=3, max_steps=40)
    again.load_state_dict(stopper.state_dict())
    with pytest.raises(StopTraining):
        again(16)
    assert again.restore() == 6 and torch.equal(again.module.weight, seen[6]["weight"])


def test_early_stopping_scores_the_last_step_and_never_stops_while_improving():
    summary, stopper, seen, _ = _fit_with_early_stopping([0.1, 0.2, 0.3], every=4, patience=1, max_steps=10)
    assert list(seen) == [4, 8, 10] and summary["train/step"] == 10.0 and stopper.restore() == 10


def test_relative_error_changes_hand_values():
    results = {"eval/massive/de-DE/intent_accuracy": 0.9, "eval/massive/avg/intent_accuracy": 0.85,
               "eval/massive/de-DE/slot_f1": 0.5}
    baseline = {"de-DE/intent_accuracy": 0.8, "avg/intent_accuracy": 0.9, "de-DE/slot_f1": 1.0}
    out = F.relative_error_changes(results, baseline)
    # (0.1 - 0.2) / 0.2 = -0.5: half the errors; (0.15 - 0.1) / 0.1 = +0.5
    assert out["compare/massive/de-DE/intent_accuracy_rel_error_change"] == pytest.approx(-0.5)
    assert out["compare/massive/avg/intent_accuracy_rel_error_change"] == pytest.approx(0.5)
    assert math.isnan(out["compare/massive/de-DE/slot_f1_rel_error_change"])  # a perfect baseline


@pytest.mark.parametrize("overrides,message", [
    (["finetune.setting=few_shot"], "finetune.setting='few_shot' must be one of full, zero_shot"),
    (["finetune.eval_locales=[de-DE]"], "finetune.setting=full: evaluation locale(s) de-DE not in finetune.locales"),
    (["finetune=zero_shot", "finetune.eval_locales=[de-DE,en-US]"],
     "finetune.setting=zero_shot: evaluation locale(s) en-US are also training locales"),
    (["finetune.locales=[]"], "finetune.locales is empty"),
    (["baseline=stage2"], "baseline=stage2: a pretrain_stage2 run has no MASSIVE scores"),
    (["baseline=runs:/abc/def"], "must be a finetune run id"),
    (["finetune.seeds=[]"], "finetune.seeds=[] must be a non-empty list of integer seeds"),
    (["finetune.seeds=[0,1,0]"], "finetune.seeds=[0, 1, 0] repeats a seed"),
    (["finetune.seeds=[0,x]"], "finetune.seeds: 'x' is not an integer seed"),
    (["finetune.seeds=3"], "finetune.seeds=3 must be a non-empty list of integer seeds"),
    (["finetune.max_train_per_locale=0"], "finetune.max_train_per_locale=0 must be an integer >= 1 or null"),
    (["finetune.early_stopping.eval_every=0"], "finetune.early_stopping.eval_every=0 must be an integer >= 1"),
    (["finetune.early_stopping.eval_every=10", "finetune.early_stopping.patience=null"],
     "finetune.early_stopping.patience=None must be an integer >= 1"),
    (["finetune.early_stopping.eval_every=10", "finetune.early_stopping.metric=loss"],
     "finetune.early_stopping.metric='loss' must be one of intent_accuracy, slot_f1, exact_match"),
    (["finetune.early_stopping.eval_every=10", "finetune.early_stopping.max_dev_per_locale=0"],
     "finetune.early_stopping.max_dev_per_locale=0 must be an integer >= 1 or null"),
    (["finetune.early_stopping.eval_every=10", "trainer=deepspeed", "trainer.deepspeed.zero_stage=3"],
     "finetune.early_stopping keeps a copy of the whole weights: ZeRO stage 3 shards them"),
])
def test_config_check_errors(overrides, message):
    cfg = compose_stage("finetune", overrides)
    with pytest.raises(AtmError) as err:
        F.check(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_presets_full_and_zero_shot():
    full, zero = compose_stage("finetune", ["finetune=full"]), compose_stage("finetune", ["finetune=zero_shot"])
    assert len(full.finetune.locales) >= 6 and list(full.finetune.eval_locales) == list(full.finetune.locales)
    # full: the whole train and test splits, early stopping on dev
    assert full.finetune.max_train_per_locale is None and full.finetune.max_eval_per_locale is None
    assert F.early_stopping_settings(full.finetune) is not None and F.early_stopping_settings(zero.finetune) is None
    # one seed by default: the run's seed
    assert list(compose_stage("finetune", ["seed=7"]).finetune.seeds) == [7]
    assert list(zero.finetune.locales) == ["en-US"] and "en-US" not in zero.finetune.eval_locales
    for cfg in (full, zero, compose_stage("finetune", [])):
        F.check(cfg)


def test_eval_sample_is_the_same_utterances_in_every_locale(real_data_env):
    cfg = compose_stage("finetune", ["finetune=zero_shot", "finetune.eval_locales=[de-DE,ja-JP]",
                                     "finetune.max_eval_per_locale=50"]).finetune
    sample = T.eval_examples(cfg)
    ids = [ex.id for ex in sample["de-DE"]]
    assert ids == [ex.id for ex in sample["ja-JP"]] and len(set(ids)) == 50
    first = [ex.id for ex in T.read_locales(["de-DE"], "test", "key")["de-DE"][:50]]
    assert ids == sorted(ids, key=int) and ids != first  # file order (ids ascend), not the first 50 lines
    with pytest.raises(AtmError, match="finetune.max_eval_per_locale=0: must be at least 1"):
        T.eval_examples(compose_stage("finetune", ["finetune.max_eval_per_locale=0"]).finetune)
    # null: the whole test split
    whole = T.eval_examples(compose_stage("finetune", ["finetune.max_eval_per_locale=null"]).finetune)
    assert len(whole["en-US"]) == 2974


def test_load_encoder_rejects_special_token_mismatch(tok, tmp_path):  # noqa: F811
    model = build_mlm(load_preset("student_tiny"), tok, seed=0)
    model.config.eos_token_id = 5
    path = save_checkpoint(model, tok, tmp_path / "bad_eos")
    with pytest.raises(AtmError, match=rf"{path}: tokenizer/model mismatch: tokenizer eos_token_id=2 but the "
                                       r"model's config has eos_token_id=5"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------ CLI


def _client(cwd):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db")


def _finetune_runs(cwd):
    return _client(cwd).search_runs(["1"], "tags.`atm.stage` = 'finetune' and attributes.status = 'FINISHED'",
                                    order_by=["attributes.start_time ASC"])


# run B: two seeds, early stopping on 16 en-US dev utterances every 2 steps
SEEDS_AND_STOPPING = ["finetune.seeds=[0,1]", "finetune.early_stopping.eval_every=2",
                      "finetune.early_stopping.patience=1", "finetune.early_stopping.max_dev_per_locale=16"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_env, encoder_dir):
    """Three real fine-tuning runs in one MLflow store: (A) full data on en-US + de-DE, (B) zero-shot from en-US
    to de-DE + fr-FR over a frozen encoder, two seeds, early stopping on dev, (C) as A with mean pooling, compared
    with A as its baseline."""
    cwd = tmp_path_factory.mktemp("finetune")
    base = ["stage=finetune", f"encoder={encoder_dir}", *FAST]
    a = atm_train([*base, "finetune.locales=[en-US,de-DE]"], cwd, data_env)
    assert a.returncode == 0, a.stderr[-3000:]
    b = atm_train([*base, "finetune=zero_shot", "finetune.eval_locales=[de-DE,fr-FR]", "finetune.freeze_encoder=true",
                   *SEEDS_AND_STOPPING], cwd, data_env)
    assert b.returncode == 0, b.stderr[-3000:]
    run_a = _finetune_runs(cwd)[0].info.run_id
    c = atm_train([*base, "finetune.locales=[en-US,de-DE]", "finetune.pooling=mean", f"baseline=runs:/{run_a}"],
                  cwd, data_env)
    assert c.returncode == 0, c.stderr[-3000:]
    return cwd


def _artifact(cwd, run_id, path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cwd}/mlflow.db")
    with open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path), encoding="utf-8") as f:
        return f.read()


def _rows(cwd, run_id, locale):
    return [json.loads(line) for line in _artifact(cwd, run_id, f"predictions/{locale}.jsonl").splitlines()]


def _official_scores(rows):
    """Intent accuracy, seqeval slot F1, official exact match (per-word slot types) of prediction rows."""
    n = len(rows)
    acc = sum(r["intent"] == r["pred_intent"] for r in rows) / n
    f1 = f1_score([r["slots"] for r in rows], [r["pred_slots"] for r in rows])
    em = sum(r["intent"] == r["pred_intent"] and M.slot_types(r["slots"]) == M.slot_types(r["pred_slots"])
             for r in rows) / n
    return {"intent_accuracy": acc, "slot_f1": f1, "exact_match": em}


def test_full_data_run_scores_agree_with_its_predictions(store):
    run = _finetune_runs(store)[0]
    m, tags = run.data.metrics, run.data.tags
    assert tags["atm.finetune.setting"] == "full" and tags["atm.finetune.freeze_encoder"] == "false"
    assert run.data.params["finetune.setting"] == "full" and run.data.params["finetune.seeds"] == "[0]"
    assert "finetune/best_step" not in m and not any(k.startswith("dev/") for k in m)  # no early stopping
    for locale in ("en-US", "de-DE"):
        rows = _rows(store, run.info.run_id, locale)
        assert len(rows) == N_EVAL == m[f"eval/massive/{locale}/n"]
        assert {r["seed"] for r in rows} == {0} and [int(r["id"]) for r in rows] == sorted(int(r["id"]) for r in rows)
        n_words = sum(len(r["slots"]) for r in rows)
        # the logged scores are those of the written predictions (seqeval on BIO tags, official exact match);
        # standard errors over utterances, for slot F1 over words; one seed: a bootstrap interval around it
        for score, value in _official_scores(rows).items():
            key = f"eval/massive/{locale}/{score}"
            assert m[key] == pytest.approx(value, abs=1e-12) and m[f"{key}/seed_0"] == m[key]
            n = n_words if score == "slot_f1" else N_EVAL
            assert m[f"{key}_se"] == pytest.approx(math.sqrt(value * (1 - value) / n))
            assert m[f"{key}_lo"] <= m[key] <= m[f"{key}_hi"]
        # per-example scores reproduce the logged ones (the contract of analysis/findings.py)
        per = M.massive_example_scores([r["pred_intent"] for r in rows], [r["intent"] for r in rows],
                                       [r["pred_slots"] for r in rows], [r["slots"] for r in rows])
        assert per[:, 1].mean() == pytest.approx(m[f"eval/massive/{locale}/exact_match"], abs=1e-12)
    for score in T.SCORES:
        assert m[f"eval/massive/avg/{score}"] == pytest.approx(
            (m[f"eval/massive/en-US/{score}"] + m[f"eval/massive/de-DE/{score}"]) / 2)
    table = _artifact(store, run.info.run_id, "evaluation/massive.md")
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["en-US", "de-DE", "avg"]
    assert "exact_match_lo" in table.splitlines()[0]


def test_zero_shot_run_over_a_frozen_encoder(store, encoder_dir):
    from atm.models import load_joint_model, load_mlm
    from atm.tracking import download

    run = _finetune_runs(store)[1]
    tags, m = run.data.tags, run.data.metrics
    assert tags["atm.finetune.setting"] == "zero_shot" and tags["atm.finetune.freeze_encoder"] == "true"
    locales = {k.split("/")[2] for k in m if k.startswith("eval/massive/")}
    assert locales == {"de-DE", "fr-FR", "avg"}  # trained on en-US, tested on the others only
    assert m["data/train_examples"] == 48 and m["data/dev_examples"] == 16  # dev: the training locale's
    # a frozen encoder comes out of fine-tuning unchanged
    tuned = load_joint_model(download(run.info.run_id, "checkpoint", store / ".atm" / "test-cache"))
    original = load_mlm(encoder_dir).roberta_prelayernorm.state_dict()
    for name, value in tuned.roberta_prelayernorm.state_dict().items():
        assert torch.equal(value, original[name]), name


def test_seeds_give_per_seed_scores_a_mean_and_an_interval_across_seeds(store):
    from scipy import stats

    run = _finetune_runs(store)[1]
    m = run.data.metrics
    for locale in ("de-DE", "fr-FR"):
        rows = _rows(store, run.info.run_id, locale)
        # one row per (seed, utterance): the seed-0 rows in file order, then the seed-1 rows in the same order
        assert [r["seed"] for r in rows] == [0] * N_EVAL + [1] * N_EVAL
        assert [r["id"] for r in rows[:N_EVAL]] == [r["id"] for r in rows[N_EVAL:]]
        assert set(rows[0]) == {"seed", "id", "utt", "intent", "pred_intent", "slots", "pred_slots"}
        assert rows[:N_EVAL] != rows[N_EVAL:]  # two different models
        for score in T.SCORES:
            key = f"eval/massive/{locale}/{score}"
            values = [_official_scores([r for r in rows if r["seed"] == s])[score] for s in (0, 1)]
            assert [m[f"{key}/seed_{s}"] for s in (0, 1)] == pytest.approx(values, abs=1e-12)
            assert m[key] == pytest.approx(np.mean(values), abs=1e-12)
            # 95% Student-t interval across the two seeds (t with 1 degree of freedom)
            half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / math.sqrt(2)
            assert (m[f"{key}_lo"], m[f"{key}_hi"]) == pytest.approx((m[key] - half, m[key] + half), abs=1e-9)
            assert m[f"{key}_lo"] <= m[key] <= m[f"{key}_hi"]
    for score in T.SCORES:
        per_seed = [m[f"eval/massive/avg/{score}/seed_{s}"] for s in (0, 1)]
        assert m[f"eval/massive/avg/{score}"] == pytest.approx(np.mean(per_seed))
        assert m[f"eval/massive/avg/{score}_lo"] <= m[f"eval/massive/avg/{score}"] <= m[f"eval/massive/avg/{score}_hi"]


def test_early_stopping_run_logs_the_dev_curve_and_tests_the_best_step(store):
    run = _finetune_runs(store)[1]
    m, client = run.data.metrics, _client(store)
    for seed, curve_key, step_key in ((0, "dev/massive/avg/exact_match", "train/step"),
                                      (1, "dev/massive/avg/exact_match/seed_1", "train/seed_1/step")):
        curve = [(x.step, x.value) for x in client.get_metric_history(run.info.run_id, curve_key)]
        steps = [s for s, _ in curve]
        assert steps == list(range(2, int(m[step_key]) + 1, 2)) and steps[-1] <= 6
        best = max(v for _, v in curve)
        assert m[f"finetune/best_step/seed_{seed}"] == min(s for s, v in curve if v == best)
        # patience 1: it stopped at the first evaluation after the best one, or at the cap
        assert int(m[step_key]) in (m[f"finetune/best_step/seed_{seed}"] + 2, 6)
    assert m["finetune/best_step"] == m["finetune/best_step/seed_0"]
    dev_keys = {k for k in m if k.startswith("dev/massive/") and "/seed_" not in k}
    assert dev_keys == {f"dev/massive/{loc}/{s}" for loc in ("en-US", "avg") for s in T.SCORES}


def test_relative_error_change_against_the_baseline_run(store):
    a, _, c = _finetune_runs(store)
    assert c.data.tags["atm.baseline_run_id"] == a.info.run_id
    mc, ma = c.data.metrics, a.data.metrics
    for key in ("en-US/intent_accuracy", "de-DE/slot_f1", "avg/exact_match", "avg/intent_accuracy"):
        err, err_base = 1 - mc[f"eval/massive/{key}"], 1 - ma[f"eval/massive/{key}"]
        assert mc[f"compare/massive/{key}_rel_error_change"] == pytest.approx((err - err_base) / err_base)
    assert "intent_accuracy_rel_error_change" in _artifact(store, c.info.run_id, "evaluation/massive.csv")


def test_one_line_errors(store, data_env, encoder_dir, tok, tmp_path):  # noqa: F811
    from atm.train import execute

    run_a = _finetune_runs(store)[0].info.run_id
    # in-process (the CLI prints these as `error: <message>`, exit status 2): a locale without data, a baseline
    # evaluated on other locales
    for args, message in (
            (["finetune.locales=[xx-XX]"], "finetune.locales: unknown MASSIVE locale(s) xx-XX (available: "),
            (["finetune.locales=[fr-FR]", f"baseline=runs:/{run_a}"],
             f"baseline=runs:/{run_a} was not evaluated on MASSIVE locale(s) fr-FR (it has: de-DE, en-US)")):
        cfg = compose_stage("finetune", [f"encoder={encoder_dir}", f"tracking.uri=sqlite:///{store}/mlflow.db",
                                         f"data.mirror={data_env['ATM_DATA_MIRROR']}", *FAST, *args])
        with pytest.raises(AtmError) as err:
            execute(cfg)
        assert message in str(err.value) and "\n" not in str(err.value)
    # the CLI: a checkpoint whose tokenizer is not the model's (its model has 8 more embedding rows)
    model = build_mlm(load_preset("student_tiny"), tok, seed=0)
    model.resize_token_embeddings(len(tok) + 8)
    swapped = tmp_path / "swapped"
    model.save_pretrained(swapped)
    tok.save_pretrained(swapped)
    result = atm_train(["stage=finetune", f"encoder={swapped}", *FAST], tmp_path, data_env)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert f"{swapped}: tokenizer/model mismatch" in lines[0] and "Traceback" not in result.stderr
