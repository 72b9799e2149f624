"""Tests for atm.metrics: hand-computed cases and cross-checks against seqeval / torch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from seqeval.metrics import f1_score, precision_score, recall_score

from atm.errors import AtmError
from atm.metrics import (
    MASSIVE_EXAMPLE_COLUMNS,
    exact_match,
    intent_accuracy,
    mask_fill_accuracy,
    masked_lm_nll,
    massive_example_scores,
    perplexity,
    relative_error_change,
    slot_f1,
    slot_f1_standard_error,
    slot_precision_recall_f1,
    slot_types,
    standard_error,
    to_bio,
)

# ---------------------------------------------------------------------------------------------
# slot F1 vs seqeval

# Each case: (gold, pred, expected micro-F1 worked out by hand).
SLOT_CASES = {
    # "wake me up at seven thirty am" -- a three-word time span, predicted exactly.
    "multiword_exact": (
        [["O", "O", "O", "O", "B-time", "I-time", "I-time"]],
        [["O", "O", "O", "O", "B-time", "I-time", "I-time"]],
        1.0,
    ),
    # Wrong boundary: the predicted span stops one word early -> 0 TP, 1 pred, 1 gold.
    "wrong_boundary": (
        [["O", "B-time", "I-time", "I-time"]],
        [["O", "B-time", "I-time", "O"]],
        0.0,
    ),
    # Two utterances, gold spans: date(2 words), place(1), person(2); predicted: date right,
    # place typed wrong (as person), person span too long -> TP=1, P=1/3, R=1/3, F1=1/3.
    "mixed": (
        [
            ["O", "B-date", "I-date", "O", "B-place_name"],
            ["B-person", "I-person", "O"],
        ],
        [
            ["O", "B-date", "I-date", "O", "B-person"],
            ["B-person", "I-person", "I-person"],
        ],
        1 / 3,
    ),
    # A missed span and a spurious one: gold 2 spans, pred 2 spans, 1 right -> F1 = 0.5.
    "miss_and_spurious": (
        [["B-a", "O", "B-b", "I-b"]],
        [["B-a", "B-c", "O", "O"]],
        0.5,
    ),
    # Extra utterance that is all-O on both sides contributes nothing.
    "with_all_o_utterance": (
        [["B-a", "I-a"], ["O", "O", "O"]],
        [["B-a", "I-a"], ["O", "O", "O"]],
        1.0,
    ),
    # Precision 1, recall 1/2: pred finds one of two gold spans -> F1 = 2/3.
    "partial_recall": (
        [["B-a", "O", "B-a"]],
        [["B-a", "O", "O"]],
        2 / 3,
    ),
}


@pytest.mark.parametrize("case", sorted(SLOT_CASES))
def test_slot_f1_matches_seqeval_and_hand_value(case):
    gold, pred, expected = SLOT_CASES[case]
    assert slot_f1(pred, gold) == pytest.approx(expected, abs=1e-12)
    assert slot_f1(pred, gold) == pytest.approx(f1_score(gold, pred), abs=1e-12)
    p, r, f = slot_precision_recall_f1(pred, gold)
    assert p == pytest.approx(precision_score(gold, pred), abs=1e-12)
    assert r == pytest.approx(recall_score(gold, pred), abs=1e-12)
    assert f == pytest.approx(expected, abs=1e-12)


def test_slot_precision_recall_hand_values():
    gold, pred, _ = SLOT_CASES["partial_recall"]
    assert slot_precision_recall_f1(pred, gold) == pytest.approx((1.0, 0.5, 2 / 3))


def test_slot_f1_no_spans_anywhere_is_zero_like_seqeval():
    # all-O and empty sequences: 0/0; seqeval returns 0 (with a warning) -- we return 0 quietly.
    for gold in ([["O", "O"], ["O"]], [[]], [[], ["O"]]):
        assert slot_f1(gold, gold) == 0.0
        assert slot_f1(gold, gold) == f1_score(gold, gold, zero_division=0)
    assert slot_f1([["O", "O"]], [["O", "O"]], zero_division=1) == 1.0


def test_slot_f1_all_o_prediction_against_spans():
    gold = [["B-a", "I-a", "O"]]
    pred = [["O", "O", "O"]]
    assert slot_f1(pred, gold) == 0.0 == f1_score(gold, pred)


def test_slot_f1_stray_inside_tag_lenient_vs_strict():
    gold = [["B-a", "I-a"]]
    pred = [["I-a", "I-a"]]  # no B-: conlleval mode still reads one span "a" over both words
    assert slot_f1(pred, gold) == 1.0 == f1_score(gold, pred)
    assert slot_f1(pred, gold, strict=True) == 0.0


def test_to_bio_converts_massive_flat_labels():
    # alexa/massive's HF release: one slot type per word, "Other" outside; a run of one type is one span
    assert to_bio(["Other", "date", "date", "time", "Other", "date"]) == [
        "O", "B-date", "I-date", "B-time", "O", "B-date"]
    assert to_bio([]) == []
    assert to_bio(["O", "x", "O"], outside="O") == ["O", "B-x", "O"]
    with pytest.raises(AtmError, match=r"labels\[1\] must be a slot label string"):
        to_bio(["Other", 3])


def test_slot_f1_with_other_label_matches_seqeval_on_bio():
    gold = [["Other", "date", "date", "Other", "place_name"], [], ["Other", "Other"]]
    pred = [["Other", "date", "Other", "Other", "place_name"], [], ["Other", "time"]]
    # gold spans: date(1-2), place_name(4); predicted: date(1) (wrong boundary), place_name(4), time(1)
    # -> TP 1, P 1/3, R 1/2, F1 = 2 * (1/3 * 1/2) / (1/3 + 1/2) = 0.4
    assert slot_f1(pred, gold, outside="Other") == pytest.approx(0.4, abs=1e-12)
    bio_gold, bio_pred = [to_bio(t) for t in gold], [to_bio(t) for t in pred]
    assert slot_f1(pred, gold, outside="Other") == pytest.approx(f1_score(bio_gold, bio_pred), abs=1e-12)
    assert slot_precision_recall_f1(pred, gold, outside="Other") == pytest.approx((1 / 3, 1 / 2, 0.4))


def test_empty_slot_sequences_count_for_exact_match_not_for_f1():
    # two utterances without words (no slots), one with a span
    gold_t, pred_t = [[], [], ["B-a", "I-a"]], [[], [], ["B-a", "I-a"]]
    assert slot_f1(pred_t, gold_t) == 1.0 == f1_score(gold_t, pred_t)
    assert exact_match(["x", "y", "z"], ["x", "q", "z"], pred_t, gold_t) == pytest.approx(2 / 3)


def test_slot_f1_accepts_tuples():
    assert slot_f1((("B-a", "O"),), [["B-a", "O"]]) == 1.0


def test_slot_length_mismatches_raise_one_line():
    with pytest.raises(AtmError, match=r"pred_tags has 1 items but gold_tags has 2"):
        slot_f1([["O"]], [["O"], ["O"]])
    with pytest.raises(AtmError, match=r"pred_tags\[1\] has 1 items but gold_tags\[1\] has 2") as e:
        slot_f1([["O"], ["O"]], [["O"], ["O", "B-a"]])
    assert "\n" not in str(e.value)
    with pytest.raises(AtmError, match=r"BIO tag string"):
        slot_f1([[1, 2]], [["O", "O"]])
    with pytest.raises(AtmError, match="empty"):
        slot_f1([], [])


# ---------------------------------------------------------------------------------------------
# intent accuracy / exact match


def test_intent_accuracy():
    assert intent_accuracy(["alarm_set", "play_music", "weather_query"],
                           ["alarm_set", "play_radio", "weather_query"]) == pytest.approx(2 / 3)
    assert intent_accuracy([1, 2, 3, 4], [1, 2, 0, 0]) == 0.5
    assert intent_accuracy(torch.tensor([1, 2]), torch.tensor([1, 2])) == 1.0
    with pytest.raises(AtmError, match="pred has 2 items but gold has 3"):
        intent_accuracy([1, 2], [1, 2, 3])
    with pytest.raises(AtmError, match="empty"):
        intent_accuracy([], [])


def test_exact_match_hand_cases():
    gold_i = ["alarm_set", "play_music", "weather_query", "alarm_set"]
    gold_t = [["O", "B-time", "I-time"], ["O", "B-song"], ["O", "O"], ["B-time"]]
    # 0: all right; 1: intent right but one tag wrong; 2: intent wrong, tags right; 3: all right
    pred_i = ["alarm_set", "play_music", "play_radio", "alarm_set"]
    pred_t = [["O", "B-time", "I-time"], ["O", "B-artist"], ["O", "O"], ["B-time"]]
    assert exact_match(pred_i, gold_i, pred_t, gold_t) == 0.5
    # A wrong boundary alone breaks exact match even with the right intent.
    assert exact_match(["a"], ["a"], [["B-x", "O"]], [["B-x", "I-x"]]) == 0.0
    # All-O utterances with the right intent count as exact matches.
    assert exact_match(["a", "b"], ["a", "b"], [["O"], []], [["O"], []]) == 1.0


def test_exact_match_is_the_official_per_word_slot_type_comparison():
    # alexa/massive eval_preds compares per-word slot types (its labels), so a span predicted "I-x I-x" for
    # gold "B-x I-x" -- the same span for seqeval's lenient F1 -- is an exact match; comparing raw BIO tags
    # (atm before) said it was not
    gold, pred = [["O", "B-time", "I-time"]], [["O", "I-time", "I-time"]]
    assert slot_f1(pred, gold) == 1.0 == f1_score(gold, pred)
    assert exact_match(["alarm_set"], ["alarm_set"], pred, gold) == 1.0
    assert slot_types(pred[0]) == slot_types(gold[0]) == ["O", "time", "time"]
    # two adjacent one-word spans of one type have the types of one two-word span: the official labels cannot
    # tell them apart, so exact match holds although seqeval's F1 (on our BIO tags) sees different spans
    adjacent, merged = [["B-date", "B-date"]], [["B-date", "I-date"]]
    assert exact_match(["a"], ["a"], merged, adjacent) == 1.0 and slot_f1(merged, adjacent) == 0.0
    # a different type, or a word inside/outside a span, breaks it
    assert exact_match(["a"], ["a"], [["O", "B-date", "I-date"]], gold) == 0.0
    assert exact_match(["a"], ["a"], [["O", "B-time", "O"]], gold) == 0.0


def test_massive_example_scores_hand_values():
    gold_i, pred_i = ["a", "b", "c"], ["a", "b", "x"]
    gold_t = [["O", "B-time", "I-time", "B-date"], ["B-x", "O"], ["O"]]
    pred_t = [["O", "I-time", "I-time", "B-place"], ["B-x", "B-y"], ["B-z"]]
    got = massive_example_scores(pred_i, gold_i, pred_t, gold_t)
    assert MASSIVE_EXAMPLE_COLUMNS == ("intent_correct", "exact_match", "slot_tp", "slot_fp", "slot_fn")
    assert got.shape == (3, 5) and got.dtype.kind == "i"
    # 0: time span right (lenient I-), date typed as place -> tp 1, fp 1, fn 1; types differ -> no exact match
    # 1: x right, spurious y -> tp 1, fp 1; 2: wrong intent, spurious z
    assert got.tolist() == [[1, 0, 1, 1, 1], [1, 0, 1, 1, 0], [0, 0, 0, 1, 0]]
    tp, fp, fn = got[:, 2:].sum(0)
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(f1_score(gold_t, pred_t), abs=1e-12)
    with pytest.raises(AtmError, match="gold_intents has 3 items but gold_tags has 2"):
        massive_example_scores(pred_i, gold_i, pred_t[:2], gold_t[:2])


def test_massive_example_scores_sum_to_seqeval_on_real_data(real_data_env):
    import random

    from atm.data.massive import read_massive

    examples = [ex for ex in read_massive(["de-DE"], ["dev"])][:600]
    gold_t = [list(ex.slot_tags) for ex in examples]
    gold_i = [ex.intent for ex in examples]
    types = {t[2:] for tags in gold_t for t in tags if t != "O"}
    inventory = ["O", *sorted(f"{prefix}-{t}" for t in types for prefix in "BI")]
    rng = random.Random(0)  # corrupt ~15% of the tags (stray I-, wrong types, cut spans) and ~20% of the intents
    pred_t = [[rng.choice(inventory) if rng.random() < 0.15 else t for t in tags] for tags in gold_t]
    pred_i = [rng.choice(gold_i) if rng.random() < 0.2 else i for i in gold_i]
    got = massive_example_scores(pred_i, gold_i, pred_t, gold_t)
    tp, fp, fn = (int(x) for x in got[:, 2:].sum(0))
    assert tp / (tp + fp) == pytest.approx(precision_score(gold_t, pred_t), abs=1e-12)
    assert tp / (tp + fn) == pytest.approx(recall_score(gold_t, pred_t), abs=1e-12)
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(f1_score(gold_t, pred_t), abs=1e-12)
    assert got[:, 0].mean() == pytest.approx(intent_accuracy(pred_i, gold_i), abs=1e-12)
    assert got[:, 1].mean() == pytest.approx(exact_match(pred_i, gold_i, pred_t, gold_t), abs=1e-12)
    assert 0 < tp and 0 < fp and 0 < fn and 0 < got[:, 1].sum() < len(examples)  # a non-trivial slice


def test_exact_match_length_mismatch():
    with pytest.raises(AtmError, match="pred_intents has 1 items but gold_intents has 2"):
        exact_match(["a"], ["a", "b"], [["O"], ["O"]], [["O"], ["O"]])
    with pytest.raises(AtmError, match="gold_intents has 2 items but gold_tags has 1"):
        exact_match(["a", "b"], ["a", "b"], [["O"]], [["O"]])


# ---------------------------------------------------------------------------------------------
# statistics


def test_standard_error_hand_values():
    # sqrt(0.8 * 0.2 / 100) = sqrt(0.0016) = 0.04
    assert standard_error(0.8, 100) == pytest.approx(0.04, abs=1e-15)
    # sqrt(0.5 * 0.5 / 2974) (MASSIVE test set size per locale)
    assert standard_error(0.5, 2974) == pytest.approx(0.5 / math.sqrt(2974), abs=1e-15)
    assert standard_error(1.0, 10) == 0.0
    assert standard_error(0.0, 10) == 0.0
    with pytest.raises(AtmError, match=r"p must be a fraction in \[0, 1\]"):
        standard_error(80.0, 100)  # a percentage, not a fraction
    with pytest.raises(AtmError, match="n must be a positive integer"):
        standard_error(0.5, 0)
    with pytest.raises(AtmError, match="n must be a positive integer"):
        standard_error(0.5, None)


def test_slot_f1_standard_error_counts_words():
    # the official scorer's n for slot F1 is the number of slot labels (words), not of utterances:
    # 100 utterances of 4 words at F1 0.8 -> sqrt(0.8 * 0.2 / 400) = 0.02, half the per-utterance value
    assert slot_f1_standard_error(0.8, 400) == pytest.approx(0.02, abs=1e-15)
    assert slot_f1_standard_error(0.8, 400) == pytest.approx(standard_error(0.8, 100) / 2, abs=1e-15)
    with pytest.raises(AtmError, match="n must be a positive integer"):
        slot_f1_standard_error(0.5, 0)


def test_relative_error_change_hand_values():
    # baseline error 0.20, new error 0.18 -> (0.18 - 0.20) / 0.20 = -0.10 (10% fewer errors)
    assert relative_error_change(0.18, 0.20) == pytest.approx(-0.10, abs=1e-12)
    # worse system: 0.25 vs 0.20 -> +0.25
    assert relative_error_change(0.25, 0.20) == pytest.approx(0.25, abs=1e-12)
    assert relative_error_change(0.2, 0.2) == 0.0
    with pytest.raises(AtmError, match="err_baseline is 0"):
        relative_error_change(0.1, 0.0)
    with pytest.raises(AtmError, match="err must be a non-negative"):
        relative_error_change(-0.1, 0.2)


# ---------------------------------------------------------------------------------------------
# perplexity / masked LM NLL / mask filling


def _fixed_logits_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[3, -100, 0, -100, 6], [-100, -100, 1, 2, -100]])
    return logits, labels


def test_masked_lm_nll_and_perplexity_match_torch_cross_entropy():
    logits, labels = _fixed_logits_labels()
    total, count = masked_lm_nll(logits, labels)
    assert count == 5
    mean_ce = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    assert total / count == pytest.approx(mean_ce.item(), rel=1e-6)
    assert perplexity(total, count) == pytest.approx(math.exp(mean_ce.item()), rel=1e-6)
    # Hand computation at one position to pin down the definition.
    logp = torch.log_softmax(logits[0, 0], dim=-1)[3].item()
    single_total, single_count = masked_lm_nll(logits[:1, :1], labels[:1, :1])
    assert (single_total, single_count) == (pytest.approx(-logp, rel=1e-6), 1)


def test_masked_lm_nll_accumulates_across_batches():
    logits, labels = _fixed_logits_labels()
    t0, c0 = masked_lm_nll(logits[:1], labels[:1])
    t1, c1 = masked_lm_nll(logits[1:], labels[1:])
    t, c = masked_lm_nll(logits, labels)
    assert c0 + c1 == c
    assert t0 + t1 == pytest.approx(t, rel=1e-6)
    assert masked_lm_nll(logits, torch.full_like(labels, -100)) == (0.0, 0)


def test_masked_lm_nll_bad_shapes():
    logits, labels = _fixed_logits_labels()
    with pytest.raises(AtmError, match=r"labels must have shape \[2, 5\] .*got \[2, 4\]"):
        masked_lm_nll(logits, labels[:, :4])
    with pytest.raises(AtmError, match=r"labels must have shape \[5\]"):
        masked_lm_nll(logits[0], labels)
    # logits already gathered at the scored positions ([N, V], labels [N]) give the same NLL
    keep = labels != -100
    assert masked_lm_nll(logits[keep], labels[keep]) == pytest.approx(masked_lm_nll(logits, labels))
    with pytest.raises(AtmError, match=r"outside \[0, 7\)"):
        masked_lm_nll(logits, torch.full_like(labels, 7))


def test_perplexity_formula_and_errors():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(AtmError, match="n_tokens must be a positive integer"):
        perplexity(1.0, 0)
    with pytest.raises(AtmError, match="total_nll must be a non-negative"):
        perplexity(-1.0, 3)


def test_mask_fill_accuracy():
    assert mask_fill_accuracy([5, 6, 7, 8], [5, 0, 7, 0]) == 0.5
    # gold -100 positions are skipped; tensors and nested shapes are flattened.
    pred = torch.tensor([[5, 9], [7, 1]])
    gold = torch.tensor([[5, -100], [0, -100]])
    assert mask_fill_accuracy(pred, gold) == 0.5
    assert mask_fill_accuracy([1, 2], [1, -100], ignore_index=None) == 0.5
    with pytest.raises(AtmError, match="pred_ids has 3 items but gold_ids has 2"):
        mask_fill_accuracy([1, 2, 3], [1, 2])
    with pytest.raises(AtmError, match="no scored positions"):
        mask_fill_accuracy([1], [-100])


def test_mask_fill_accuracy_scores_whole_words_given_as_tuples():
    # word 1 has two sub-tokens, one wrong: the word is not recovered; word 2 is.
    pred = [(5, 9), (7,)]
    gold = [(5, 8), (7,)]
    assert mask_fill_accuracy(pred, gold) == 0.5
    # as flat token lists the same predictions score 2 of 3 sub-tokens
    assert mask_fill_accuracy([[5, 9], [7]], [[5, 8], [7]]) == pytest.approx(2 / 3)
