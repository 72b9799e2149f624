"""Tests of atm.stages.evaluate: whole-word mask filling (written nouns, spoken slot words), per-language
perplexity, the per-language tables, and the evaluate CLI on real data slices."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import atm_train
from test_finetune import _example, encoder_dir, tok  # noqa: F401  (module fixtures: a tiny MLM checkpoint)

from atm.data.massive import read_massive
from atm.data.ud import pud_sentences
from atm.errors import AtmError
from atm.lineage import compose_stage
from atm.models import load_mlm
from atm.stages import evaluate as E

SEQ = 32


def _by_hand(model, tokenizer, words, word):
    """The word masked alone in its sentence, scored with one forward pass: all sub-tokens right?"""
    enc = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=SEQ)
    positions = [i for i, w in enumerate(enc.word_ids()) if w == word]
    if not positions:
        return None
    ids = torch.tensor([enc["input_ids"]])
    target = ids[0, positions].tolist()
    ids[0, positions] = tokenizer.mask_token_id
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[0, positions].argmax(-1).tolist() == target


def test_slot_probes_select_the_words_inside_slot_spans():
    ex = _example("wake me up at [time : five am] [date : this week] please")
    assert E.slot_probes([ex]) == [(ex.words, [4, 5, 6, 7])]
    assert E.slot_probes([_example("hello there")]) == [(("hello", "there"), [])]


def test_word_mask_fill_equals_one_word_at_a_time(real_data_env, encoder_dir):  # noqa: F811
    from atm.models.tokenizer import load_tokenizer

    tokenizer, model = load_tokenizer(encoder_dir), load_mlm(encoder_dir).eval()
    probes = E.noun_probes("en", 3) + E.slot_probes(read_massive(["de-DE"], ["test"])[:4])
    assert all(p[1] for p in probes[:3])  # PUD sentences have nouns
    # make the model recover some words: raise the LM bias of the sub-token of a one-sub-token masked word
    single = []
    for words, selected in probes:
        enc = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=SEQ)
        for w in selected:
            positions = [i for i, wid in enumerate(enc.word_ids()) if wid == w]
            if len(positions) == 1:
                single.append(enc["input_ids"][positions[0]])
    with torch.no_grad():
        model.lm_head.decoder.bias[single[0]] += 30.0  # argmax everywhere: that sub-token
    hand = [_by_hand(model, tokenizer, words, w) for words, selected in probes for w in selected]
    hand = [h for h in hand if h is not None]
    expected = sum(hand) / len(hand)
    assert 0 < expected < 1
    assert E.word_mask_fill(model, tokenizer, probes, SEQ) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(E.word_mask_fill(model, tokenizer, [(("a", "b"), [])], SEQ))


def test_language_table():
    rows = [{"step": 2, "eval/xnli/de/accuracy": 0.4, "eval/xnli/de/accuracy_se": 0.1, "eval/xnli/avg_accuracy": 0.4},
            {"step": 4, "eval/xnli/de/accuracy": 0.5, "eval/xnli/avg_accuracy": 0.5, "eval/perplexity/written": 9.0}]
    assert E.language_table(rows, E.TABLES["xnli"]) == [{"language": "de", "step 2": 0.4, "step 4": 0.5},
                                                        {"language": "avg", "step 2": 0.4, "step 4": 0.5}]
    assert E.language_table(rows, E.TABLES["perplexity"]) == [{"language": "written/all (UD dev)", "step 4": 9.0}]
    fill = [{"step": 0, "eval/mask_fill/spoken/de-DE/slot_accuracy": 0.1, "eval/mask_fill/spoken/slot_accuracy": 0.1,
             "eval/mask_fill/en/noun_accuracy": 0.2, "eval/mask_fill/noun_accuracy": 0.2}]
    assert [r["language"] for r in E.language_table(fill, E.TABLES["mask_fill"])] == [
        "spoken/de-DE", "spoken/mean", "written/en", "written/mean"]


@pytest.mark.parametrize("override,message", [
    ("eval.perplexity.written_languages=[en,xx]", "eval.perplexity.written_languages: unknown PUD language 'xx'"),
    ("eval.mask_fill.spoken_locales=[de-DE,xx-XX]", "eval.mask_fill.spoken_locales: unknown MASSIVE locale 'xx-XX'"),
])
def test_eval_data_errors_name_the_key(real_data_env, override, message):
    with pytest.raises(AtmError, match=message):
        E.eval_data(compose_stage("evaluate", [override]).eval)


# ------------------------------------------------------------------------------------------ CLI

SMALL = ["eval.checkpoints=final", "data.max_seq_len=32", "data.heldout.max_lines_per_lang=4",
         "eval.perplexity.max_lines_per_lang=5", "eval.perplexity.written_languages=[en,de]",
         "eval.perplexity.spoken_locales=[en-US,fr-FR]", "eval.mask_fill.languages=[en]",
         "eval.mask_fill.max_sentences_per_lang=3", "eval.mask_fill.spoken_locales=[de-DE]",
         "eval.mask_fill.max_utterances_per_locale=4", "eval.xnli.train_pairs=16", "eval.xnli.batch_size=8",
         "eval.xnli.max_test_pairs_per_lang=8", "eval.xnli.max_seq_len=48"]


def test_evaluate_cli_per_language_metrics_and_tables(tmp_path, data_env, real_data_env, encoder_dir):  # noqa: F811
    import mlflow

    result = atm_train(["stage=evaluate", f"target={encoder_dir}", *SMALL], tmp_path, data_env)
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    run = mlflow.tracking.MlflowClient().search_runs(["1"])[0]
    m = run.data.metrics
    # the logged numbers are those of the same probes computed here
    from atm.models.tokenizer import load_tokenizer

    tokenizer, model = load_tokenizer(encoder_dir), load_mlm(encoder_dir).eval()
    pud_en = [s.text for s in pud_sentences("en")[:5]]
    assert m["eval/perplexity/written/en"] == pytest.approx(E.mlm_perplexity(model, tokenizer, pud_en, 32), rel=1e-5)
    fr = [ex.utt for ex in read_massive(["fr-FR"], ["test"])[:5]]
    assert m["eval/perplexity/spoken/fr-FR"] == pytest.approx(E.mlm_perplexity(model, tokenizer, fr, 32), rel=1e-5)
    slots = E.word_mask_fill(model, tokenizer, E.slot_probes(read_massive(["de-DE"], ["test"])[:4]), 32)
    assert m["eval/mask_fill/spoken/de-DE/slot_accuracy"] == m["eval/mask_fill/spoken/slot_accuracy"] == slots
    assert {"eval/perplexity/written", "eval/perplexity/spoken", "eval/perplexity/written/de",
            "eval/perplexity/spoken/en-US", "eval/mask_fill/en/noun_accuracy", "eval/mask_fill/noun_accuracy",
            "eval/xnli/avg_accuracy"} <= set(m)
    langs = [k.split("/")[2] for k in m if k.startswith("eval/xnli/") and k.endswith("/accuracy")]
    assert len(langs) >= 10 and "en" in langs  # every language with a labelled XNLI test set
    for lang in langs:
        acc = m[f"eval/xnli/{lang}/accuracy"]
        assert m[f"eval/xnli/{lang}/accuracy_se"] == pytest.approx(math.sqrt(acc * (1 - acc) / 8))
    xnli = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation/xnli.md",
                                               dst_path=str(tmp_path / "dl"))
    with open(xnli, encoding="utf-8") as f:
        rows = [line.split("|")[1].strip() for line in f.read().splitlines()[2:]]
    assert rows == [*langs, "avg"]
    artifacts = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {f"evaluation/{n}.{x}" for n in ("xnli", "perplexity", "mask_fill") for x in ("csv", "md")} <= artifacts
