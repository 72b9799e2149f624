"""The XNLI probe: a pair classifier fine-tuned on English XNLI, scored zero-shot on other languages.

Zero-shot cross-lingual transfer (Conneau et al. 2018, "XNLI: Evaluating Cross-lingual Sentence
Representations"; AlexaTM, FitzGerald et al. KDD 2022, sec. 4.2 and Table 3). This is atm's one XNLI routine:
the probe of ``stage=evaluate`` (:func:`xnli_probe`), the ``finetune_xnli`` stage (:func:`train_classifier`
+ :func:`evaluate_xnli`; its classifier is the teacher of ``distill_task``) and ``distill_task``'s scores
(:func:`evaluate_xnli`) all train, predict and score through it.

* Inputs: ``tokenizer(premise, hypothesis)`` = ``<s> premise </s></s> hypothesis </s>``, at most
  ``eval.xnli.max_seq_len`` sub-tokens; labels 0 entailment, 1 neutral, 2 contradiction
  (:data:`atm.data.xnli.LABELS`).
* Training sample of seed ``s``: a ``random.Random(s)`` shuffle of the 9,000-pair English training set, cut to
  ``eval.xnli.train_pairs`` (null: all of it) (:func:`sample_indices`).
* Batches: training batches are length-grouped (:class:`LengthGroupedStream`), test batches length-sorted
  (:func:`predict`), so little compute goes to padding; the data are tokenized once per checkpoint
  (:func:`encode_xnli`) and shared by all seeds.
* Metrics (:func:`xnli_metrics`), accuracies as fractions: see its docstring; in short
  ``<prefix>/<lang>/accuracy`` (mean over seeds) with ``_lo``/``_hi`` (95% interval: Student-t over seeds,
  :func:`atm.stats.seed_interval`; with one seed the percentile bootstrap over test pairs,
  :func:`atm.stats.bootstrap_interval`) and ``_se``, ``<prefix>/<lang>/pred_share/<class>``,
  ``<prefix>/<lang>/degenerate`` and the averages over languages.

Inside an MLflow run, the pairs read are logged as MLflow datasets (:mod:`atm.data.mlflow_datasets`, digest over
the pairs in file order): ``xnli/train/en`` (context ``training``: the English pairs classifiers are trained on
-- one seed's sample, or in the probe the union of its seeds' samples) and ``xnli/test/<lang>`` (context
``test``: the test pairs scored).

A probe that never predicts one of the three classes on a language (for any seed) is *degenerate*: its
accuracy there says how the test set's classes are balanced, not what the encoder knows, so tables show
``degenerate`` instead of the number.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig

from atm import metrics as M
from atm import stats
from atm.data.collate import BatchStream
from atm.data.mlflow_datasets import active_run_id, examples_read, log_reads
from atm.data.xnli import LABELS, TEST_FILE, TRAIN_FILE, XnliPair, xnli_test, xnli_train
from atm.engine.loop import device_for, fit, to_device
from atm.errors import AtmError
from atm.models.heads import build_pair_classifier
from atm.probes.examples import concat, example_frame

#: The language XNLI classifiers are trained on (zero-shot transfer to the others).
TRAIN_LANGUAGE = "en"
N_CLASSES = len(LABELS)


# ------------------------------------------------------------------------------------------- data


def sample_indices(n: int, train_pairs: int | None, seed: int) -> list[int]:
    """Indices of seed ``seed``'s training sample among ``n`` pairs: a ``random.Random(seed)`` shuffle, the
    first ``train_pairs`` (None: all ``n``). The same permutation as shuffling the pairs themselves."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:train_pairs]


def pair_key(pair: XnliPair) -> str:
    """The text of a pair that its MLflow dataset digest covers: language, label, premise, hypothesis."""
    return f"{pair.lang}\t{pair.label}\t{pair.premise}\t{pair.hypothesis}"


def log_train_pairs(pairs: Sequence[XnliPair], indices: Iterable[int]) -> None:
    """Log the training pairs ``pairs[i]`` of ``indices`` (in file order, each once) as the MLflow dataset
    ``xnli/train/en`` of the active run, context ``training`` (nothing outside a run)."""
    if active_run_id() is None:
        return
    log_reads([examples_read(f"xnli/train/{TRAIN_LANGUAGE}", [pairs[i] for i in sorted(set(indices))],
                             [TRAIN_FILE.format(lang=TRAIN_LANGUAGE)], "training", key=pair_key)])


def log_test_pairs(test: Mapping[str, Sequence[XnliPair]]) -> None:
    """Log each language's test pairs as the MLflow dataset ``xnli/test/<lang>`` of the active run, context
    ``test`` (nothing outside a run)."""
    log_reads(examples_read(f"xnli/test/{lang}", pairs, [TEST_FILE.format(lang=lang)], "test", key=pair_key)
              for lang, pairs in test.items())


def train_pairs(xnli_cfg: DictConfig, seed: int) -> list[XnliPair]:
    """The English training sample of ``seed`` (:func:`sample_indices` of ``eval.xnli.train_pairs``), logged as
    the MLflow dataset ``xnli/train/en`` (:func:`log_train_pairs`)."""
    pairs = xnli_train(TRAIN_LANGUAGE)
    indices = sample_indices(len(pairs), xnli_cfg.train_pairs, seed)
    log_train_pairs(pairs, indices)
    return [pairs[i] for i in indices]


def pair_examples(tokenizer, pairs: Sequence[XnliPair], max_seq_len: int) -> list[dict]:
    """``{"input_ids": <s> premise </s></s> hypothesis </s> (at most max_seq_len sub-tokens), "labels": 0|1|2}``
    per pair (``[]`` for no pairs)."""
    if not pairs:
        return []
    enc = tokenizer([p.premise for p in pairs], [p.hypothesis for p in pairs], truncation=True,
                    max_length=max_seq_len)
    return [{"input_ids": ids, "labels": p.label} for ids, p in zip(enc["input_ids"], pairs)]


def pair_collator(tokenizer) -> Callable[[list[dict]], dict]:
    """Pads :func:`pair_examples` items into ``input_ids[B,T]``, ``attention_mask[B,T]``, ``labels[B]``."""
    def collate(items):
        batch = tokenizer.pad({"input_ids": [x["input_ids"] for x in items]}, return_tensors="pt")
        batch["labels"] = torch.tensor([x["labels"] for x in items])
        return batch

    return collate


class LengthGroupedStream(BatchStream):
    """A :class:`~atm.data.collate.BatchStream` whose batches hold examples of similar length.

    The order of epoch ``e`` is transformers' ``get_length_grouped_indices`` (a seeded permutation cut into
    mega-batches of up to 50 batches, each sorted by length) with the order of its batches shuffled again,
    both from a generator seeded by ``(seed, e)``; so batches are random in composition and order but nearly
    free of padding, and the stream stays resumable (the order depends only on ``(seed, e)``).
    """

    def __init__(self, examples: Sequence[dict], batch_size: int, collate: Callable, seed: int):
        super().__init__(examples, batch_size, collate, seed)
        self.lengths = [len(x["input_ids"]) for x in examples]

    def _permutation(self, epoch: int) -> list[int]:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        size = self.batch_size * self.world_size
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        order = get_length_grouped_indices(self.lengths, size, generator=generator)
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        full = [c for c in chunks if len(c) == size]
        rest = [i for c in chunks if len(c) < size for i in c]  # the epoch's short last batch stays last
        return [i for k in torch.randperm(len(full), generator=generator).tolist() for i in full[k]] + rest


def pair_stream(tokenizer, pairs: list[XnliPair], max_seq_len: int, batch_size: int, seed: int) -> LengthGroupedStream:
    """Endless length-grouped batches of ``pairs`` (:func:`pair_collator`, :class:`LengthGroupedStream`)."""
    return LengthGroupedStream(pair_examples(tokenizer, pairs, max_seq_len), batch_size, pair_collator(tokenizer), seed)


@dataclass
class XnliData:
    """XNLI pairs (:func:`read_xnli`) or their encodings (:func:`encode_xnli`), train and test.

    Attributes:
        train: every English training pair, file order; a seed's sample is :func:`sample_indices` of it.
        test: per language, its first ``max_test_pairs_per_lang`` labelled test pairs, file order (item ``i``
            is the ``i``-th test pair; XNLI test sets are row-aligned across languages).
    """

    train: list
    test: dict[str, list]


def read_xnli(xnli_cfg: DictConfig, languages: Sequence[str], *, train: bool = True) -> XnliData:
    """The English training pairs (when ``train``) and the test pairs of ``languages`` (``eval.xnli``).

    Logged as MLflow datasets: ``xnli/test/<lang>`` (:func:`log_test_pairs`) and, when ``train``,
    ``xnli/train/en``: the pairs the probe's seeds ``eval.xnli.seeds`` train on (:func:`log_train_pairs`).

    Raises:
        AtmError: a language without a labelled test set (:func:`atm.data.xnli.xnli_test`).
    """
    cap = xnli_cfg.max_test_pairs_per_lang
    data = XnliData(train=xnli_train(TRAIN_LANGUAGE) if train else [],
                    test={lang: xnli_test(lang)[:cap] for lang in languages})
    if train:  # the seeds as xnli_probe uses them
        n, seeds = len(data.train), xnli_cfg.get("seeds")
        log_train_pairs(data.train, range(n) if not seeds else
                        (i for seed in seeds for i in sample_indices(n, xnli_cfg.train_pairs, seed)))
    log_test_pairs(data.test)
    return data


def encode_xnli(tokenizer, pairs: XnliData, max_seq_len: int) -> XnliData:
    """:func:`pair_examples` of every pair of ``pairs``: tokenized once per checkpoint, shared by its seeds."""
    return XnliData(train=pair_examples(tokenizer, pairs.train, max_seq_len),
                    test={lang: pair_examples(tokenizer, test, max_seq_len) for lang, test in pairs.test.items()})


# --------------------------------------------------------------------------------------- training


def probe_trainer(trainer_cfg: DictConfig, xnli_cfg: DictConfig, n_train: int) -> DictConfig:
    """The ``trainer`` config of the probe: ``eval.xnli.epochs`` epochs of ``n_train`` pairs in batches of
    ``eval.xnli.batch_size`` at peak learning rate ``eval.xnli.lr``, 10% linear warm-up, no checkpoints or
    training states; device, precision, backend etc. from ``trainer_cfg``."""
    steps = max(1, round(xnli_cfg.epochs * n_train / xnli_cfg.batch_size))
    return DictConfig({**trainer_cfg, "max_steps": steps, "lr": xnli_cfg.lr, "batch_size": xnli_cfg.batch_size,
                       "warmup_steps": max(1, steps // 10), "save_every": None, "state_every": None})


def train_classifier(mlm, tokenizer, examples: Sequence[dict], trainer_cfg: DictConfig, seed: int, *,
                     desc: str = "xnli", log_metrics: bool = False):
    """Fine-tune a fresh 3-class pair classifier over (a copy of) the encoder of ``mlm`` on ``examples``.

    The head's initialisation, the batch order (:class:`LengthGroupedStream`) and dropout follow ``seed``
    (``torch.manual_seed(seed)`` first). Cross-entropy, :func:`atm.engine.loop.fit` for
    ``trainer_cfg.max_steps`` steps.

    Args:
        mlm: an MLM model or checkpoint directory (:func:`atm.models.heads.build_pair_classifier`).
        examples: :func:`pair_examples` items.

    Returns:
        ``(classifier, fit summary)``; the classifier is on ``trainer_cfg``'s device.
    """
    torch.manual_seed(seed)
    model = build_pair_classifier(mlm, num_labels=N_CLASSES).to(device_for(trainer_cfg))
    stream = LengthGroupedStream(examples, trainer_cfg.batch_size, pair_collator(tokenizer), seed)
    summary = fit(model, stream, lambda batch, step: (model(**batch).loss, {}), trainer_cfg, desc=desc,
                  log_metrics=log_metrics)
    return model, summary


@torch.no_grad()
def predict(model, tokenizer, examples: Sequence[dict], batch_size: int) -> np.ndarray:
    """Predicted class ids ``[n]`` (argmax of the logits) of ``examples``, in their order.

    Scored in batches of ``batch_size`` examples sorted by length (padding only to the longest of similar
    lengths), with the model in eval mode.
    """
    model.eval()
    device = next(model.parameters()).device
    collate = pair_collator(tokenizer)
    order = np.argsort([len(x["input_ids"]) for x in examples], kind="stable")
    out = np.empty(len(examples), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = to_device(collate([examples[i] for i in idx]), device)
        out[idx] = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                         ).logits.argmax(-1).cpu().numpy()
    return out


def gold_labels(examples: Sequence[dict]) -> np.ndarray:
    """The gold class ids ``[n]`` of :func:`pair_examples` items."""
    return np.asarray([x["labels"] for x in examples], dtype=np.int64)


# ---------------------------------------------------------------------------------------- metrics


def is_degenerate(predicted: np.ndarray) -> bool:
    """True when some seed's predictions ``[seeds, n]`` miss one of the :data:`N_CLASSES` classes."""
    return bool(any((np.bincount(row, minlength=N_CLASSES)[:N_CLASSES] == 0).any() for row in np.atleast_2d(predicted)))


def xnli_metrics(predicted: dict[str, np.ndarray], gold: dict[str, np.ndarray], prefix: str = "eval/xnli", *,
                 detail: bool = True) -> dict[str, float]:
    """XNLI metrics of one classifier per seed.

    Args:
        predicted: per language, predicted class ids ``[seeds, n]`` (seed ``s`` row ``s``; ``[n]`` is one seed).
        gold: per language, gold class ids ``[n]``.
        detail: also the intervals, class shares and degenerate flags (else only the first three keys below).

    Returns:
        ``<prefix>/<lang>/accuracy``: the mean over seeds of the seed's accuracy;
        ``<prefix>/<lang>/accuracy_se``: its binomial standard error over test pairs, ``sqrt(p(1-p)/n)``;
        ``<prefix>/avg_accuracy``: the mean over languages; with ``detail``:
        ``<prefix>/<lang>/accuracy_lo``, ``..._hi``: 95% interval, Student-t over seeds
        (:func:`atm.stats.seed_interval`), with one seed the percentile bootstrap over test pairs
        (:func:`atm.stats.bootstrap_interval`);
        ``<prefix>/<lang>/pred_share/<class>``: fraction of predictions (all seeds) of each class of
        :data:`atm.data.xnli.LABELS`;
        ``<prefix>/<lang>/degenerate``: 1.0 when a seed never predicts some class (:func:`is_degenerate`), else 0.0;
        ``<prefix>/avg_accuracy_lo``, ``..._hi``: over seeds of the per-seed averages, with one seed the
        bootstrap over test items (a resample draws item ``i`` of every language together, XNLI being
        row-aligned; NaN when the languages have different numbers of pairs);
        ``<prefix>/degenerate_languages``: the number of degenerate languages.

    Raises:
        AtmError: no languages, or predictions and gold labels of different lengths (naming the language).
    """
    if not predicted:
        raise AtmError(f"{prefix}: no XNLI languages to score")
    out: dict[str, float] = {}
    per_seed, correct_items = [], []
    for lang, pred in predicted.items():
        pred = np.atleast_2d(pred)
        if pred.shape[1] != len(gold[lang]) or not len(gold[lang]):
            raise AtmError(f"{prefix}/{lang}: {pred.shape[1]} predictions for {len(gold[lang])} test pairs")
        correct = (pred == gold[lang][None, :]).astype(np.float64)  # [seeds, n]
        seed_acc = correct.mean(axis=1)
        accuracy = float(seed_acc.mean())
        key = f"{prefix}/{lang}/accuracy"
        out[key] = accuracy
        out[f"{key}_se"] = M.standard_error(accuracy, correct.shape[1])
        per_seed.append(seed_acc)
        correct_items.append(correct[0])
        if detail:
            interval = stats.seed_interval(seed_acc) if len(seed_acc) > 1 else stats.bootstrap_interval(correct[0])
            out[f"{key}_lo"], out[f"{key}_hi"] = interval.lo, interval.hi
            shares = np.bincount(pred.ravel(), minlength=N_CLASSES)[:N_CLASSES] / pred.size
            out.update({f"{prefix}/{lang}/pred_share/{name}": float(s) for name, s in zip(LABELS, shares)})
            out[f"{prefix}/{lang}/degenerate"] = float(is_degenerate(pred))
    avg_per_seed = np.mean(per_seed, axis=0)  # [seeds]
    out[f"{prefix}/avg_accuracy"] = float(avg_per_seed.mean())
    if detail:
        if len(avg_per_seed) > 1:
            interval = stats.seed_interval(avg_per_seed)
        elif len({len(c) for c in correct_items}) == 1:
            interval = stats.bootstrap_interval(np.mean(correct_items, axis=0))
        else:
            interval = stats.Interval(out[f"{prefix}/avg_accuracy"], float("nan"), float("nan"), 0)
        out[f"{prefix}/avg_accuracy_lo"], out[f"{prefix}/avg_accuracy_hi"] = interval.lo, interval.hi
        out[f"{prefix}/degenerate_languages"] = float(sum(out[f"{prefix}/{lang}/degenerate"] for lang in predicted))
    return out


def evaluate_xnli(model, tokenizer, languages: Sequence[str], xnli_cfg: DictConfig, prefix: str = "eval/xnli", *,
                  detail: bool = False, data: XnliData | None = None) -> dict[str, float]:
    """Score one trained pair classifier on the first ``max_test_pairs_per_lang`` test pairs of each language
    (:func:`predict` in batches of ``eval.xnli.eval_batch_size``; :func:`xnli_metrics` of one seed).

    Args:
        data: the encoded test sets (:func:`encode_xnli`); encoded here when not given.

    Raises:
        AtmError: a language without a labelled test set (see :func:`atm.data.xnli.xnli_test`).
    """
    if data is None:
        data = encode_xnli(tokenizer, read_xnli(xnli_cfg, languages, train=False), xnli_cfg.max_seq_len)
    predicted = {lang: predict(model, tokenizer, data.test[lang], xnli_cfg.eval_batch_size) for lang in languages}
    return xnli_metrics(predicted, {lang: gold_labels(data.test[lang]) for lang in languages}, prefix, detail=detail)


def xnli_probe(mlm, tokenizer, data: XnliData, xnli_cfg: DictConfig, trainer_cfg: DictConfig,
               prefix: str = "eval/xnli") -> tuple[dict[str, float], pd.DataFrame]:
    """The XNLI probe of an MLM: for each seed of ``eval.xnli.seeds``, a classifier trained on the seed's
    English sample (:func:`train_classifier`, :func:`probe_trainer`), scored on every test set of ``data``.

    Args:
        mlm: the MLM model (or checkpoint directory) whose encoder is probed; it is not modified.
        data: :func:`encode_xnli` with the checkpoint's tokenizer.
        xnli_cfg: the ``eval.xnli`` group; ``trainer_cfg``: the ``trainer`` group (device, precision, ...).

    Returns:
        ``(metrics, examples)``: :func:`xnli_metrics` with ``detail``, and one row per (language, seed, test
        pair) in the format of :mod:`atm.probes.examples` (``probe=xnli``, ``pred`` = the predicted class id).
    """
    seeds = list(xnli_cfg.seeds)
    predicted: dict[str, list[np.ndarray]] = {lang: [] for lang in data.test}
    for seed in seeds:
        sample = [data.train[i] for i in sample_indices(len(data.train), xnli_cfg.train_pairs, seed)]
        model, _ = train_classifier(mlm, tokenizer, sample, probe_trainer(trainer_cfg, xnli_cfg, len(sample)), seed)
        for lang, test in data.test.items():
            predicted[lang].append(predict(model, tokenizer, test, xnli_cfg.eval_batch_size))
        del model
    gold = {lang: gold_labels(test) for lang, test in data.test.items()}
    stacked = {lang: np.stack(rows) for lang, rows in predicted.items()}
    frames = [example_frame("xnli", lang, np.arange(len(gold[lang])), row == gold[lang], seed=seed, pred=row)
              for lang, rows in stacked.items() for seed, row in zip(seeds, rows)]
    return xnli_metrics(stacked, gold, prefix), concat(frames)


# ------------------------------------------------------------------------------------------ config


def _int_at_least(value, key: str, low: int, *, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = f"an integer >= {low}" + (" or null" if nullable else "")
        raise AtmError(f"{key}={value!r} must be {allowed}")


def check_xnli(xnli_cfg: DictConfig, key: str = "eval.xnli") -> None:
    """Config-time validation of the ``eval.xnli`` group (before anything trains).

    Raises:
        AtmError: naming the key: ``train_pairs`` / ``max_test_pairs_per_lang`` not a positive integer or
            null, ``batch_size`` / ``eval_batch_size`` not a positive integer, ``max_seq_len`` < 8,
            ``epochs`` / ``lr`` not a positive number, ``languages`` not null or a list of languages with a
            labelled test set, ``seeds`` empty, not integers, or repeated.
    """
    _int_at_least(xnli_cfg.train_pairs, f"{key}.train_pairs", 1, nullable=True)
    _int_at_least(xnli_cfg.max_test_pairs_per_lang, f"{key}.max_test_pairs_per_lang", 1, nullable=True)
    for name in ("batch_size", "eval_batch_size"):
        _int_at_least(xnli_cfg[name], f"{key}.{name}", 1)
    _int_at_least(xnli_cfg.max_seq_len, f"{key}.max_seq_len", 8)
    for name in ("epochs", "lr"):
        value = xnli_cfg[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise AtmError(f"{key}.{name}={value!r} must be a positive number")
    languages = xnli_cfg.get("languages")
    if languages is not None:
        from atm.data.xnli import xnli_test_languages

        available = xnli_test_languages()
        if not isinstance(languages, (list, tuple, ListConfig)) or not languages:
            raise AtmError(f"{key}.languages={languages!r} must be null (every language with a test set) or a "
                           "non-empty list, e.g. [en, de]")
        unknown = [lang for lang in languages if lang not in available]
        if unknown:
            raise AtmError(f"{key}.languages: no labelled XNLI test set for {', '.join(map(str, unknown))} "
                           f"(available: {', '.join(available) or 'none'})")
    seeds = xnli_cfg.seeds
    if not isinstance(seeds, (list, tuple, ListConfig)) or not seeds or any(
            isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise AtmError(f"{key}.seeds={seeds!r} must be a non-empty list of integers, e.g. [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise AtmError(f"{key}.seeds={seeds!r} repeats a seed")
