"""Tests of atm.probes: whole-word mask-filling ranks on hand-set logits, the XNLI probe's metrics (seed and
bootstrap intervals, degenerate flags, class shares), its length-grouped batches, and its per-example rows."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from test_finetune import encoder_dir, tok  # noqa: F401  (module fixtures: a tiny MLM checkpoint)

from atm import stats
from atm.errors import AtmError
from atm.lineage import compose_stage
from atm.probes import examples as EX
from atm.probes import mask_fill as MF
from atm.probes import xnli as X

# ------------------------------------------------------------------------------------- mask filling

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "▁", "▁me", "▁at", "s", "e", "v", "n"]


@pytest.fixture(scope="module")
def hand_tok():
    """A 12-piece unigram tokenizer: ``me at seven`` -> ``<s> ▁me ▁at ▁ s e v e n </s>`` (ids 0 6 7 5 8 9 10 9 11 2)."""
    from transformers import XLMRobertaTokenizer

    return XLMRobertaTokenizer(vocab=[(p, 0.0 if i < 5 else -1.0) for i, p in enumerate(PIECES)])


class FixedLogitsMLM(torch.nn.Module):
    """A fake masked LM for :func:`atm.models.encoder.mlm_forward`: the logits at position ``t`` are row ``t``
    of ``table [T, V]``, whatever the input."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.lm_head = torch.nn.Linear(table.shape[0], table.shape[1], bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(table.T)

    def base_model(self, input_ids, attention_mask, **_):
        batch, length = input_ids.shape
        hidden = torch.eye(self.lm_head.in_features)[:length].expand(batch, length, -1)  # one-hot of the position
        return SimpleNamespace(last_hidden_state=hidden, hidden_states=None, attentions=None)


def _golden_table() -> torch.Tensor:
    """Logits of ``<s> me at seven </s>`` (10 positions x 12 ids) with hand-checkable ranks of the gold ids.

    * position 1 (``me``, gold 6): score 1 for ids 3, 6, 8, 2 for the other 9 -> 9 above, plus the tie with
      the lower id 3 (argmax takes the lower id first; id 8 ranks behind) -> rank 11;
    * position 2 (``at``, gold 7): the only 1 -> rank 1;
    * ``seven``, positions 3-8 (golds 5 8 9 10 9 11): rank 1 everywhere but position 5 (gold 9, id 4 above:
      rank 2) and position 7 (gold 9, ids 10 and 11 above: rank 3) -> the word's rank is 3.
    """
    table = torch.zeros(10, len(PIECES))
    table[1] = 2.0
    table[1, [3, 6, 8]] = 1.0
    for pos, gold in zip(range(2, 9), (7, 5, 8, 9, 10, 9, 11)):
        table[pos, gold] = 1.0
    table[5, 4] = 2.0
    table[7, [10, 11]] = torch.tensor([3.0, 2.0])
    return table


def test_word_ranks_golden(hand_tok):
    model = FixedLogitsMLM(_golden_table())
    probes = [(("me", "at", "seven"), [0, 1, 2])]
    items, ranks = MF.word_ranks(model, hand_tok, probes, max_seq_len=32)
    assert items.tolist() == [0, 1, 2]
    assert ranks.tolist() == [11, 1, 3]  # a word's rank: the max over its sub-tokens' ranks
    scores = MF.rank_scores(ranks, k=10)
    assert scores == pytest.approx({"accuracy": 1 / 3, "top10": 2 / 3, "mrr": (1 / 11 + 1 + 1 / 3) / 3})
    # top-1 is the argmax criterion: only "at" has the argmax right at all of its positions
    assert MF.word_mask_fill(model, hand_tok, probes, 32) == pytest.approx(1 / 3)


def test_token_ranks_are_the_stable_descending_sort():
    logits = torch.randint(0, 4, (50, 7)).float()  # many ties
    gold = torch.randint(0, 7, (50,))
    reference = torch.argsort(-logits, dim=1, stable=True).argsort(dim=1).gather(1, gold[:, None])[:, 0] + 1
    assert MF.token_ranks(logits, gold).tolist() == reference.tolist()
    assert ((MF.token_ranks(logits, gold) == 1) == (logits.argmax(-1) == gold)).all()


def test_word_ranks_items_skip_truncated_words(hand_tok):
    model = FixedLogitsMLM(_golden_table())
    probes = [(("me", "at", "seven"), [0, 2]), (("me",), [0])]
    # "seven" keeps only its first sub-token at 5 sub-tokens: not scored, but it keeps its item number (1)
    items, ranks = MF.word_ranks(model, hand_tok, probes, max_seq_len=5)
    assert items.tolist() == [0, 2] and ranks.tolist() == [11, 11]
    assert MF.word_ranks(model, hand_tok, probes, max_seq_len=32)[0].tolist() == [0, 1, 2]
    empty = MF.word_ranks(model, hand_tok, [(("me",), [])], 32)
    assert empty[0].size == 0 and math.isnan(MF.rank_scores(empty[1])["mrr"])


def test_rank_scores_intervals_are_bootstraps_over_words():
    ranks = np.array([1, 2, 5, 11, 1, 30, 3, 1])
    scores = MF.rank_scores(ranks, intervals=True)
    mrr = stats.bootstrap_interval(1 / ranks)
    assert (scores["mrr"], scores["mrr_lo"], scores["mrr_hi"]) == pytest.approx((mrr.estimate, mrr.lo, mrr.hi))
    assert scores["mrr_lo"] < scores["mrr"] < scores["mrr_hi"]
    assert scores["top10"] == 6 / 8 and scores["accuracy"] == 3 / 8


# ---------------------------------------------------------------------------------------------- XNLI


def test_xnli_metrics_one_seed_golden():
    gold = {"de": np.array([0, 1, 1, 0, 2, 2]), "fr": np.array([0, 1, 2, 0, 1, 2])}
    predicted = {"de": np.array([0, 1, 2, 0, 2, 1]), "fr": np.array([1, 1, 1, 1, 1, 1])}
    m = X.xnli_metrics(predicted, gold)
    assert m["eval/xnli/de/accuracy"] == pytest.approx(4 / 6) and m["eval/xnli/fr/accuracy"] == pytest.approx(2 / 6)
    assert m["eval/xnli/de/accuracy_se"] == pytest.approx(math.sqrt(4 / 6 * 2 / 6 / 6))
    de = stats.bootstrap_interval(np.array([1, 1, 0, 1, 1, 0]))
    assert (m["eval/xnli/de/accuracy_lo"], m["eval/xnli/de/accuracy_hi"]) == (de.lo, de.hi)
    # fr predicts "neutral" only: degenerate; de predicts all three classes
    assert m["eval/xnli/fr/degenerate"] == 1.0 and m["eval/xnli/de/degenerate"] == 0.0
    assert m["eval/xnli/degenerate_languages"] == 1.0
    assert [m[f"eval/xnli/de/pred_share/{c}"] for c in ("entailment", "neutral", "contradiction")] == pytest.approx(
        [2 / 6, 2 / 6, 2 / 6])
    assert m["eval/xnli/fr/pred_share/neutral"] == 1.0 and m["eval/xnli/fr/pred_share/entailment"] == 0.0
    assert m["eval/xnli/avg_accuracy"] == pytest.approx(0.5)
    # the average's bootstrap resamples test items of both languages together (XNLI is row-aligned)
    avg = stats.bootstrap_interval(np.array([0.5, 1, 0, 0.5, 1, 0]))
    assert (m["eval/xnli/avg_accuracy_lo"], m["eval/xnli/avg_accuracy_hi"]) == (avg.lo, avg.hi)
    short = X.xnli_metrics(predicted, gold, "eval/xnli_teacher", detail=False)
    assert set(short) == {f"eval/xnli_teacher/{k}" for k in ("de/accuracy", "de/accuracy_se", "fr/accuracy",
                                                             "fr/accuracy_se", "avg_accuracy")}


def test_xnli_metrics_several_seeds():
    gold = {"en": np.array([0, 1, 2, 0, 1, 2])}
    predicted = {"en": np.array([[0, 1, 2, 0, 1, 1],    # 5/6, all classes
                                 [0, 1, 1, 0, 1, 0]])}  # 4/6, never contradiction -> degenerate
    m = X.xnli_metrics(predicted, gold)
    assert m["eval/xnli/en/accuracy"] == pytest.approx(0.75)
    interval = stats.seed_interval([5 / 6, 4 / 6])
    assert (m["eval/xnli/en/accuracy_lo"], m["eval/xnli/en/accuracy_hi"]) == pytest.approx((interval.lo, interval.hi))
    assert m["eval/xnli/avg_accuracy_lo"] == pytest.approx(interval.lo)
    assert m["eval/xnli/en/degenerate"] == 1.0  # one seed missing a class is enough, though the pooled shares are not 0
    assert m["eval/xnli/en/pred_share/contradiction"] == pytest.approx(1 / 12)
    with pytest.raises(AtmError, match="eval/xnli/en: 5 predictions for 6 test pairs"):
        X.xnli_metrics({"en": np.zeros(5, dtype=int)}, gold)


class LengthClassifier(torch.nn.Module):
    """A fake pair classifier predicting ``(number of real tokens) % 3``."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        n = attention_mask.sum(-1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(n % 3, 3).float() + self.weight)


def test_predict_returns_predictions_in_example_order(hand_tok):
    rng = np.random.default_rng(0)
    examples = [{"input_ids": [0] + [5] * int(n) + [2], "labels": 0} for n in rng.integers(1, 40, size=37)]
    predicted = X.predict(LengthClassifier(), hand_tok, examples, batch_size=8)
    assert predicted.tolist() == [len(x["input_ids"]) % 3 for x in examples]


def _padding(batches, examples) -> float:
    """Padding tokens per real token when each batch is padded to its longest example."""
    lengths = [[len(examples[i]["input_ids"]) for i in batch] for batch in batches]
    return sum(max(b) * len(b) - sum(b) for b in lengths) / sum(map(sum, lengths))


def test_length_grouped_stream_batches_similar_lengths_and_resumes():
    from atm.data.collate import BatchStream

    rng = np.random.default_rng(1)
    examples = [{"input_ids": list(range(int(n))), "labels": i} for i, n in enumerate(rng.integers(5, 90, size=1000))]
    stream = X.LengthGroupedStream(examples, 16, lambda items: [x["labels"] for x in items], seed=3)
    epoch = [next(stream) for _ in range(1000 // 16)]
    seen = [i for batch in epoch for i in batch]
    assert len(seen) == len(set(seen)) == 1000 // 16 * 16  # one epoch: every example at most once, full batches
    plain = BatchStream(examples, 16, stream.collate, seed=3)
    assert _padding(epoch, examples) < 0.1 * _padding([next(plain) for _ in range(1000 // 16)], examples)
    longest = [max(len(examples[i]["input_ids"]) for i in batch) for batch in epoch]
    assert sorted(longest) != longest and sorted(longest, reverse=True) != longest  # batch order shuffled
    again = X.LengthGroupedStream(examples, 16, stream.collate, seed=3)
    again.load_state_dict({**stream.state_dict(), "epoch": 0, "offset": 16 * 5})
    assert next(again) == epoch[5]  # resumable: the order depends on (seed, epoch) only


def test_sample_indices_match_the_shuffled_pairs():
    import random

    pairs = list("abcdefghij")
    shuffled = pairs.copy()
    random.Random(4).shuffle(shuffled)
    assert [pairs[i] for i in X.sample_indices(10, 6, 4)] == shuffled[:6]
    assert len(X.sample_indices(10, None, 4)) == 10


def test_pair_examples(hand_tok):
    from atm.data.xnli import XnliPair

    encoded = X.pair_examples(hand_tok, [XnliPair("me at", "seven", 2, "en")], 32)
    assert encoded == [{"input_ids": [0, 6, 7, 2, 2, 5, 8, 9, 10, 9, 11, 2], "labels": 2}]  # <s> p </s></s> h </s>
    assert X.pair_examples(hand_tok, [], 32) == []  # e.g. the training set of a scoring-only call


def test_xnli_probe_rows_and_metrics_agree(real_data_env, encoder_dir):  # noqa: F811
    from atm.models import load_mlm
    from atm.models.tokenizer import load_tokenizer

    tokenizer, mlm = load_tokenizer(encoder_dir), load_mlm(encoder_dir)
    cfg = compose_stage("evaluate", ["eval.xnli.train_pairs=16", "eval.xnli.batch_size=8", "eval.xnli.seeds=[0,5]",
                                     "eval.xnli.max_test_pairs_per_lang=12", "eval.xnli.max_seq_len=40",
                                     "eval.xnli.eval_batch_size=5", "trainer.device=cpu"])
    data = X.encode_xnli(tokenizer, X.read_xnli(cfg.eval.xnli, ["de", "en"]), 40)
    assert len(data.train) == 9000 and [len(t) for t in data.test.values()] == [12, 12]
    metrics, rows = X.xnli_probe(mlm, tokenizer, data, cfg.eval.xnli, cfg.trainer)
    assert list(rows.columns) == list(EX.COLUMNS) and len(rows) == 2 * 2 * 12
    assert set(rows["probe"]) == {"xnli"} and rows["rank"].isna().all() and set(rows["seed"]) == {0, 5}
    for (lang, seed), part in rows.groupby(["language", "seed"]):
        assert part["item"].tolist() == list(range(12))
        assert (part["correct"] == (part["pred"] == X.gold_labels(data.test[lang])).astype(int)).all()
    for lang in ("de", "en"):
        per_seed = rows[rows["language"] == lang].groupby("seed")["correct"].mean()
        assert metrics[f"eval/xnli/{lang}/accuracy"] == pytest.approx(per_seed.mean())
        assert metrics[f"eval/xnli/{lang}/accuracy_lo"] == pytest.approx(stats.seed_interval(per_seed.tolist()).lo)
        preds = rows[rows["language"] == lang].pivot(index="seed", columns="item", values="pred").to_numpy()
        assert metrics[f"eval/xnli/{lang}/degenerate"] == float(X.is_degenerate(preds.astype(int)))
    # the same seed trains the same classifier
    again, _ = X.xnli_probe(mlm, tokenizer, data, DictConfig({**cfg.eval.xnli, "seeds": [5]}), cfg.trainer)
    assert again["eval/xnli/en/accuracy"] == pytest.approx(rows.query("language == 'en' and seed == 5")["correct"].mean())


@pytest.mark.parametrize("override,message", [
    ("eval.xnli.seeds=[]", r"eval.xnli.seeds=\[\] must be a non-empty list of integers"),
    ("eval.xnli.seeds=[1,1]", r"eval.xnli.seeds=\[1, 1\] repeats a seed"),
    ("eval.xnli.train_pairs=0", "eval.xnli.train_pairs=0 must be an integer >= 1 or null"),
    ("eval.xnli.max_test_pairs_per_lang=-1", "eval.xnli.max_test_pairs_per_lang=-1 must be an integer >= 1 or null"),
    ("eval.xnli.epochs=0", "eval.xnli.epochs=0 must be a positive number"),
    ("eval.xnli.eval_batch_size=0", "eval.xnli.eval_batch_size=0 must be an integer >= 1"),
    ("eval.checkpoints=some", "eval.checkpoints='some' must be 'final' or 'all'"),
    ("eval.xnli.languages=[en,xx]", r"eval.xnli.languages: no labelled XNLI test set for xx \(available: "),
    ("eval.xnli.languages=[]", r"eval.xnli.languages=\[\] must be null"),
])
def test_probe_settings_fail_before_training(override, message):
    from atm.stages import evaluate, finetune_xnli

    with pytest.raises(AtmError, match=message):
        evaluate.check(compose_stage("evaluate", [override]))
    if override.startswith("eval.xnli"):
        with pytest.raises(AtmError, match=message):
            finetune_xnli.check(compose_stage("finetune_xnli", [override]))
