"""Tests of atm.stages.finetune: MASSIVE scores from word-level predictions, settings, baseline comparison, and
the CLI on real data (full data, zero-shot over a frozen encoder, relative error change, one-line errors)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import atm_train
from seqeval.metrics import f1_score
from test_models import tok  # noqa: F401  (module fixture: a 600-piece tokenizer on real SLURP text)

from atm.data.massive import MassiveExample, parse_annot_utt
from atm.errors import AtmError
from atm.lineage import compose_stage
from atm.models import build_mlm, load_preset, save_checkpoint
from atm.stages import finetune as F

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
    encoded = F.encode(hand, examples, ["alarm_set", "x"], slots, max_seq_len=32)
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
    tags = [[slots[i] for i in F.word_predictions(item["word_ids"], row)] for item, row in zip(encoded, (row0, row1))]
    assert tags == [["O", "O", "B-time", "I-time"], ["I-time", "O"]]
    scores = F.score_predictions(["alarm_set", "x"], tags, examples)
    gold = [list(ex.slot_tags) for ex in examples]
    assert scores["slot_f1"] == 1.0 == f1_score(gold, tags)  # both spans right (lenient IOB, as MASSIVE)
    # utterance 0 is an exact match; utterance 1 has the wrong intent and I-time where gold has B-time
    assert scores["intent_accuracy"] == 0.5 and scores["exact_match"] == 0.5
    assert scores["intent_accuracy_se"] == scores["exact_match_se"] == pytest.approx(math.sqrt(0.5 * 0.5 / 2))
    assert scores["slot_f1_se"] == 0.0


def test_scores_with_empty_and_all_o_utterances():
    examples = [_example("me at five"), _example("[time : five am]"),
                MassiveExample("2", "en-US", "test", "alarm", "alarm_set", "", (), ())]
    pred_tags = [["O", "O", "O"], ["B-time", "O"], []]
    scores = F.score_predictions(["alarm_set", "alarm_set", "alarm_set"], pred_tags, examples)
    # one gold span, one predicted span with the wrong boundary: F1 0; exact match: utterances 0 and 2
    assert scores["slot_f1"] == 0.0
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["exact_match_se"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 3))
    assert scores["intent_accuracy"] == 1.0 and scores["intent_accuracy_se"] == 0.0


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
])
def test_config_check_errors(overrides, message):
    cfg = compose_stage("finetune", overrides)
    with pytest.raises(AtmError) as err:
        F.check(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_presets_full_and_zero_shot():
    full, zero = compose_stage("finetune", ["finetune=full"]), compose_stage("finetune", ["finetune=zero_shot"])
    assert len(full.finetune.locales) >= 6 and list(full.finetune.eval_locales) == list(full.finetune.locales)
    assert list(zero.finetune.locales) == ["en-US"] and "en-US" not in zero.finetune.eval_locales
    for cfg in (full, zero, compose_stage("finetune", [])):
        F.check(cfg)


def test_eval_sample_is_the_same_utterances_in_every_locale(real_data_env):
    cfg = compose_stage("finetune", ["finetune=zero_shot", "finetune.eval_locales=[de-DE,ja-JP]",
                                     "finetune.max_eval_per_locale=50"]).finetune
    sample = F.eval_examples(cfg)
    ids = [ex.id for ex in sample["de-DE"]]
    assert ids == [ex.id for ex in sample["ja-JP"]] and len(set(ids)) == 50
    first = [ex.id for ex in F.read_locales(["de-DE"], "test", "key")["de-DE"][:50]]
    assert ids == sorted(ids, key=int) and ids != first  # file order (ids ascend), not the first 50 lines
    with pytest.raises(AtmError, match="finetune.max_eval_per_locale=0: must be at least 1"):
        F.eval_examples(compose_stage("finetune", ["finetune.max_eval_per_locale=0"]).finetune)


def test_load_encoder_rejects_special_token_mismatch(tok, tmp_path):  # noqa: F811
    model = build_mlm(load_preset("student_tiny"), tok, seed=0)
    model.config.eos_token_id = 5
    path = save_checkpoint(model, tok, tmp_path / "bad_eos")
    with pytest.raises(AtmError, match=rf"{path}: tokenizer/model mismatch: tokenizer eos_token_id=2 but the "
                                       r"model's config has eos_token_id=5"):
        F.load_encoder(path)


# ------------------------------------------------------------------------------------------ CLI


def _client(cwd):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{cwd}/mlflow.db")


def _finetune_runs(cwd):
    return _client(cwd).search_runs(["1"], "tags.`atm.stage` = 'finetune' and attributes.status = 'FINISHED'",
                                    order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def store(tmp_path_factory, data_env, encoder_dir):
    """Three real fine-tuning runs in one MLflow store: (A) full data on en-US + de-DE, (B) zero-shot from en-US
    to de-DE + fr-FR over a frozen encoder, (C) as A with mean pooling, compared with A as its baseline."""
    cwd = tmp_path_factory.mktemp("finetune")
    base = ["stage=finetune", f"encoder={encoder_dir}", *FAST]
    a = atm_train([*base, "finetune.locales=[en-US,de-DE]"], cwd, data_env)
    assert a.returncode == 0, a.stderr[-3000:]
    b = atm_train([*base, "finetune=zero_shot", "finetune.eval_locales=[de-DE,fr-FR]", "finetune.freeze_encoder=true"],
                  cwd, data_env)
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


def test_full_data_run_scores_agree_with_its_predictions(store):
    run = _finetune_runs(store)[0]
    m, tags = run.data.metrics, run.data.tags
    assert tags["atm.finetune.setting"] == "full" and tags["atm.finetune.freeze_encoder"] == "false"
    assert run.data.params["finetune.setting"] == "full"
    for locale in ("en-US", "de-DE"):
        rows = [json.loads(line) for line in _artifact(store, run.info.run_id, f"predictions/{locale}.jsonl")
                .splitlines()]
        assert len(rows) == N_EVAL == m[f"eval/massive/{locale}/n"]
        # the logged scores are those of the written predictions (seqeval on BIO tags, exact match)
        acc = sum(r["intent"] == r["pred_intent"] for r in rows) / N_EVAL
        f1 = f1_score([r["slots"] for r in rows], [r["pred_slots"] for r in rows])
        em = sum(r["intent"] == r["pred_intent"] and r["slots"] == r["pred_slots"] for r in rows) / N_EVAL
        for score, value in (("intent_accuracy", acc), ("slot_f1", f1), ("exact_match", em)):
            assert m[f"eval/massive/{locale}/{score}"] == pytest.approx(value, abs=1e-12)
            assert m[f"eval/massive/{locale}/{score}_se"] == pytest.approx(math.sqrt(value * (1 - value) / N_EVAL))
    for score in F.SCORES:
        assert m[f"eval/massive/avg/{score}"] == pytest.approx(
            (m[f"eval/massive/en-US/{score}"] + m[f"eval/massive/de-DE/{score}"]) / 2)
    table = _artifact(store, run.info.run_id, "evaluation/massive.md")
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["en-US", "de-DE", "avg"]


def test_zero_shot_run_over_a_frozen_encoder(store, encoder_dir):
    from atm.models import load_joint_model, load_mlm
    from atm.tracking import download

    run = _finetune_runs(store)[1]
    tags, m = run.data.tags, run.data.metrics
    assert tags["atm.finetune.setting"] == "zero_shot" and tags["atm.finetune.freeze_encoder"] == "true"
    locales = {k.split("/")[2] for k in m if k.startswith("eval/massive/")}
    assert locales == {"de-DE", "fr-FR", "avg"}  # trained on en-US, tested on the others only
    assert m["data/train_examples"] == 48
    # a frozen encoder comes out of fine-tuning unchanged
    tuned = load_joint_model(download(run.info.run_id, "checkpoint", store / ".atm" / "test-cache"))
    original = load_mlm(encoder_dir).roberta_prelayernorm.state_dict()
    for name, value in tuned.roberta_prelayernorm.state_dict().items():
        assert torch.equal(value, original[name]), name


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
            (["finetune.locales=[xx-XX]"], "finetune.eval_locales: unknown MASSIVE locale 'xx-XX'"),
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
