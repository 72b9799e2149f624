"""Tests of atm.stages.evaluate: whole-word mask filling (written nouns, spoken slot words: top-1, top-10, MRR),
per-language perplexity, the per-language tables (degenerate XNLI probes marked), and the evaluate CLI on real
data slices (metrics, per-example rows, tables)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import atm_train
from test_finetune import _example, encoder_dir, tok  # noqa: F401  (module fixtures: a tiny MLM checkpoint)

from atm.data.massive import read_massive
from atm.data.ud import pud_sentences
from atm.errors import AtmError
from atm.lineage import compose_stage
from atm.models import load_mlm
from atm.probes.perplexity import mlm_perplexity
from atm.stages import evaluate as E

SEQ = 32


def _by_hand(model, tokenizer, words, word):
    """The word masked alone in its sentence, scored with one forward pass: all sub-tokens right? (None: the
    word lost some or all of its sub-tokens to truncation)"""
    enc = tokenizer(list(words), is_split_into_words=True, truncation=True, max_length=SEQ)
    positions = [i for i, w in enumerate(enc.word_ids()) if w == word]
    if not positions or len(positions) != tokenizer(list(words), is_split_into_words=True).word_ids().count(word):
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
             "eval/mask_fill/en/noun_accuracy": 0.2, "eval/mask_fill/noun_accuracy": 0.2,
             "eval/mask_fill/en/noun_mrr": 0.3, "eval/mask_fill/en/noun_mrr_lo": 0.25, "eval/mask_fill/noun_mrr": 0.3}]
    assert [r["language"] for r in E.language_table(fill, E.TABLES["mask_fill"])] == [
        "spoken/de-DE", "spoken/mean", "written/en", "written/mean"]
    assert E.language_table(fill, E.TABLES["mask_fill_mrr"]) == [{"language": "written/en", "step 0": 0.3},
                                                                 {"language": "written/mean", "step 0": 0.3}]


def test_xnli_table_marks_degenerate_probes():
    def scores(step, de, fr):
        return {"step": step, "eval/xnli/de/accuracy": 0.3400004, "eval/xnli/de/degenerate": de,
                "eval/xnli/fr/accuracy": 0.4, "eval/xnli/fr/degenerate": fr, "eval/xnli/avg_accuracy": 0.37,
                "eval/xnli/degenerate_languages": de + fr}

    table = E.xnli_table([scores(2, 1.0, 1.0), scores(4, 1.0, 0.0), scores(6, 0.0, 0.0)])
    assert table == [{"language": "de", "step 2": "degenerate", "step 4": "degenerate", "step 6": 0.34},
                     {"language": "fr", "step 2": "degenerate", "step 4": 0.4, "step 6": 0.4},
                     {"language": "avg", "step 2": "degenerate", "step 4": 0.37, "step 6": 0.37},
                     {"language": "degenerate languages", "step 2": 2.0, "step 4": 1.0, "step 6": 0.0}]


def test_mask_fill_metrics_keys_and_rows(real_data_env, encoder_dir):  # noqa: F811
    from atm.models.tokenizer import load_tokenizer
    from atm.probes.mask_fill import rank_scores, word_ranks

    tokenizer, model = load_tokenizer(encoder_dir), load_mlm(encoder_dir).eval()
    probes = {"de-DE": E.slot_probes(read_massive(["de-DE"], ["test"])[:4]),
              "fr-FR": E.slot_probes(read_massive(["fr-FR"], ["test"])[:3])}
    metrics, rows = E.mask_fill_metrics(model, tokenizer, probes, SEQ, "slot")
    for loc, lang_probes in probes.items():
        items, ranks = word_ranks(model, tokenizer, lang_probes, SEQ)
        for name, value in rank_scores(ranks, intervals=True).items():
            assert metrics[f"eval/mask_fill/spoken/{loc}/slot_{name}"] == value
        part = rows[rows["language"] == loc]
        assert part["item"].tolist() == items.tolist() and part["rank"].tolist() == ranks.tolist()
        assert (part["correct"] == (ranks == 1)).all() and part["pred"].isna().all() and set(part["seed"]) == {-1}
    for name in ("accuracy", "top10", "mrr"):
        assert metrics[f"eval/mask_fill/spoken/slot_{name}"] == pytest.approx(
            (metrics[f"eval/mask_fill/spoken/de-DE/slot_{name}"] + metrics[f"eval/mask_fill/spoken/fr-FR/slot_{name}"]) / 2)
    assert set(rows["probe"]) == {"slot"}


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
         "eval.xnli.max_test_pairs_per_lang=8", "eval.xnli.max_seq_len=48", "eval.xnli.seeds=[0,1]"]


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
    assert m["eval/perplexity/written/en"] == pytest.approx(mlm_perplexity(model, tokenizer, pud_en, 32), rel=1e-5)
    fr = [ex.utt for ex in read_massive(["fr-FR"], ["test"])[:5]]
    assert m["eval/perplexity/spoken/fr-FR"] == pytest.approx(mlm_perplexity(model, tokenizer, fr, 32), rel=1e-5)
    slots = E.word_mask_fill(model, tokenizer, E.slot_probes(read_massive(["de-DE"], ["test"])[:4]), 32)
    assert m["eval/mask_fill/spoken/de-DE/slot_accuracy"] == m["eval/mask_fill/spoken/slot_accuracy"] == slots
    assert {"eval/perplexity/written", "eval/perplexity/spoken", "eval/perplexity/written/de",
            "eval/perplexity/spoken/en-US", "eval/mask_fill/en/noun_accuracy", "eval/mask_fill/noun_accuracy",
            "eval/mask_fill/en/noun_top10", "eval/mask_fill/en/noun_mrr", "eval/mask_fill/noun_top10",
            "eval/mask_fill/noun_mrr", "eval/mask_fill/spoken/de-DE/slot_top10", "eval/mask_fill/spoken/de-DE/slot_mrr",
            "eval/mask_fill/spoken/slot_top10", "eval/mask_fill/spoken/slot_mrr", "eval/xnli/avg_accuracy",
            "eval/xnli/avg_accuracy_lo", "eval/xnli/degenerate_languages", "eval/checkpoint_seconds"} <= set(m)
    langs = [k.split("/")[2] for k in m if k.startswith("eval/xnli/") and k.endswith("/accuracy")]
    assert len(langs) >= 10 and "en" in langs  # every language with a labelled XNLI test set
    client = mlflow.tracking.MlflowClient()
    examples = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="evaluation/examples/step-000000.csv", dst_path=str(tmp_path / "ex")))
    assert list(examples.columns) == ["probe", "language", "item", "seed", "correct", "rank", "pred"]
    xnli = examples[examples["probe"] == "xnli"]
    assert len(xnli) == len(langs) * 2 * 8 and set(xnli["seed"]) == {0, 1} and xnli["rank"].isna().all()
    for lang in langs:
        acc = m[f"eval/xnli/{lang}/accuracy"]
        assert m[f"eval/xnli/{lang}/accuracy_se"] == pytest.approx(math.sqrt(acc * (1 - acc) / 8))
        part = xnli[xnli["language"] == lang]
        assert acc == pytest.approx(part["correct"].mean())  # 2 seeds x the same 8 pairs
        missing = any(set(p["pred"]) != {0, 1, 2} for _, p in part.groupby("seed"))
        assert m[f"eval/xnli/{lang}/degenerate"] == float(missing)
        assert sum(m[f"eval/xnli/{lang}/pred_share/{c}"] for c in ("entailment", "neutral", "contradiction")) == (
            pytest.approx(1.0))
    assert m["eval/xnli/degenerate_languages"] == sum(m[f"eval/xnli/{lang}/degenerate"] for lang in langs)
    slot_rows = examples[(examples["probe"] == "slot") & (examples["language"] == "de-DE")]
    assert slot_rows["correct"].mean() == pytest.approx(slots) and slot_rows["pred"].isna().all()
    assert (slot_rows["seed"] == -1).all() and (slot_rows["rank"] >= 1).all()
    assert m["eval/mask_fill/spoken/de-DE/slot_mrr"] == pytest.approx((1 / slot_rows["rank"]).mean())
    assert set(examples[examples["probe"] == "noun"]["language"]) == {"en"}
    table = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation/xnli.md",
                                                dst_path=str(tmp_path / "dl"))
    with open(table, encoding="utf-8") as f:
        cells = [[c.strip() for c in line.split("|")[1:3]] for line in f.read().splitlines()[2:]]
    assert [row for row, _ in cells] == [*langs, "avg", "degenerate languages"]
    for lang, cell in cells[:len(langs)]:  # a degenerate probe's accuracy is not shown as a number
        assert (cell == "degenerate") == (m[f"eval/xnli/{lang}/degenerate"] == 1)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {f"evaluation/{n}.{x}" for n in ("xnli", "perplexity", "mask_fill", "mask_fill_top10", "mask_fill_mrr")
            for x in ("csv", "md")} <= artifacts


def test_the_final_checkpoint_is_logged_at_its_training_step(tmp_path):
    """``eval.checkpoints=final`` on a run logs at the run's ``train/step`` (list_checkpoints' final step), so
    a Stage-2 teacher's checkpoint does not pose as step 0 beside Stage-1 checkpoints."""
    import mlflow

    from atm import tracking

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:  # a fresh store of its own: no experiment or run left active by another test
        client = mlflow.tracking.MlflowClient()
        experiment = client.create_experiment("final-step")
        trained, bare = (client.create_run(experiment).info.run_id for _ in range(2))
        client.log_metric(trained, "train/step", 600.0, step=600)
        assert tracking.final_step(trained) == 600
        assert tracking.final_step(bare) is None
        assert tracking.list_checkpoints(trained) == [(600, tracking.CHECKPOINT)]
    finally:
        mlflow.set_tracking_uri(before)
