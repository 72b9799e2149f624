"""SentencePiece unigram tokenizers with fairseq/XLM-R special-token ids, as Hugging Face tokenizers.

The teachers and students of AlexaTM (FitzGerald et al., KDD 2022) are RoBERTa-style encoders over a
SentencePiece vocabulary (Kudo, 2018, unigram LM; Kudo & Richardson, 2018).  This module trains such a
vocabulary in-process with the ``sentencepiece`` library and wraps it as a
:class:`transformers.XLMRobertaTokenizer` (a ``tokenizers``-backed, i.e. "fast", tokenizer in
transformers v5), so that checkpoints saved with ``save_pretrained`` load in any Hugging Face tool.

Special-token ids follow fairseq / XLM-R: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2, ``<unk>`` = 3, and
``<mask>`` = 4.  Unlike XLM-R (which shifts every SentencePiece id by one and appends ``<mask>`` at the
end), the SentencePiece model here is trained with those ids directly, so SentencePiece ids and Hugging
Face ids are identical and the ``spm.model`` kept next to the tokenizer is interchangeable with it.

A directory written by :func:`train_tokenizer` contains ``tokenizer.json``, ``tokenizer_config.json``
(the Hugging Face files), ``spm.model`` (the raw SentencePiece model) and ``atm_tokenizer.json``
(the training arguments, for provenance).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from atm.errors import AtmError
from atm.files import atomic_dir

__all__ = [
    "SPECIAL_TOKENS",
    "SPM_MODEL_FILE",
    "check_compatible",
    "load_tokenizer",
    "tokenizer_stats",
    "train_tokenizer",
]

#: Special tokens and their fixed ids (fairseq / XLM-R convention).
SPECIAL_TOKENS: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
#: Name of the raw SentencePiece model kept next to the Hugging Face files.
SPM_MODEL_FILE = "spm.model"
#: Training arguments written next to the tokenizer.
TRAINING_ARGS_FILE = "atm_tokenizer.json"
#: SentencePiece's unigram EM splits work over threads and the learnt scores depend (slightly) on the
#: number of threads, so a fixed default keeps ``same lines + seed -> same vocabulary`` on any machine.
DEFAULT_NUM_THREADS = 4
#: Number of training sentences on which the Hugging Face tokenizer is checked against SentencePiece.
_N_CHECK_SENTENCES = 200

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def _sentences(lines: Iterable[str], max_sentences: int | None, seed: int) -> list[str]:
    """Strip lines, drop empty ones; with ``max_sentences``, a seeded uniform sample in input order."""
    def text(line) -> str:
        return (line.decode("utf-8") if isinstance(line, bytes) else str(line)).strip()

    if max_sentences is None:
        return [s for s in map(text, lines) if s]
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    n = 0
    for line in lines:
        s = text(line)
        if not s:
            continue
        if len(reservoir) < max_sentences:
            reservoir.append((n, s))
        else:
            j = rng.randrange(n + 1)
            if j < max_sentences:
                reservoir[j] = (n, s)
        n += 1
    reservoir.sort()
    return [s for _, s in reservoir]


def _hf_tokenizer_from_proto(model_bytes: bytes, model_max_length: int):
    """Build an ``XLMRobertaTokenizer`` (tokenizers backend) from a serialised SentencePiece model."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import XLMRobertaTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise AtmError("sentencepiece model is not a unigram model")
    vocab = [(p.piece, float(p.score)) for p in proto.pieces]
    for piece, want in SPECIAL_TOKENS.items():
        if want >= len(vocab) or vocab[want][0] != piece:
            got = vocab[want][0] if want < len(vocab) else None
            raise AtmError(f"sentencepiece model has {got!r} at id {want}, expected {piece!r}")
    charsmap = proto.normalizer_spec.precompiled_charsmap or None
    return XLMRobertaTokenizer(
        vocab=vocab, _spm_precompiled_charsmap=charsmap, model_max_length=model_max_length
    )


def _check_special_ids(tokenizer, where: str) -> None:
    for piece, want in SPECIAL_TOKENS.items():
        got = tokenizer.convert_tokens_to_ids(piece)
        if got != want:
            raise AtmError(f"{where}: special token {piece} has id {got}, expected {want}")
    named = {
        "bos_token_id": 0, "cls_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
        "sep_token_id": 2, "unk_token_id": 3, "mask_token_id": 4,
    }
    for attr, want in named.items():
        got = getattr(tokenizer, attr, None)
        if got != want:
            raise AtmError(f"{where}: tokenizer.{attr} is {got}, expected {want}")


def _check_agreement(tokenizer, model_bytes: bytes, sentences: list[str]) -> None:
    """Fail if the HF tokenizer segments a sample differently from SentencePiece itself."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    specials = tuple(SPECIAL_TOKENS)
    sample = [s for s in sentences if not any(t in s for t in specials)][:_N_CHECK_SENTENCES]
    if not sample:
        return
    ours = tokenizer(sample, add_special_tokens=False)["input_ids"]
    for text, ids in zip(sample, ours):
        ref = sp.encode(text)
        if ids != ref:
            raise AtmError(
                f"tokenizer conversion disagrees with sentencepiece on {text!r}: {ids} != {ref}"
            )


def train_tokenizer(
    lines: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int,
    *,
    seed: int = 0,
    character_coverage: float = 0.9995,
    max_sentences: int | None = None,
    num_threads: int = DEFAULT_NUM_THREADS,
    model_max_length: int = 512,
):
    """Train a SentencePiece unigram vocabulary and save it as a Hugging Face tokenizer in ``out_dir``.

    Args:
        lines: training text, one sentence per item (stripped; empty lines are skipped).
        out_dir: directory to write (replaced atomically: trained in a temporary directory next to it,
            then renamed).  Receives ``tokenizer.json``, ``tokenizer_config.json``, ``spm.model`` and
            ``atm_tokenizer.json``.
        vocab_size: number of pieces including the five special tokens (ids 0-4, see
            :data:`SPECIAL_TOKENS`).
        seed: seed of the sentence sample drawn when ``max_sentences`` is set (the sample is drawn
            here with :class:`random.Random`, because SentencePiece's own sampler is not seedable
            reliably from Python).  SentencePiece's unigram training itself is deterministic.
        character_coverage: fraction of characters covered by the vocabulary; rarer characters map
            to ``<unk>`` (SentencePiece's ``--character_coverage``; 0.9995 for rich scripts).
        max_sentences: train on a uniform sample of at most this many non-empty lines (order kept).
        num_threads: SentencePiece training threads.  The learnt vocabulary depends on this number,
            so keep the default for reproducible vocabularies across machines.
        model_max_length: ``tokenizer.model_max_length`` (RoBERTa: 512 = 514 positions - 2).

    Returns:
        The trained tokenizer, loaded back from ``out_dir`` (an ``XLMRobertaTokenizer``).

    Raises:
        AtmError: bad arguments, no non-empty line, ``vocab_size`` larger than the text supports
            (the message tells the largest possible value), or a tokenizer that disagrees with
            SentencePiece on the training text.

    Normalisation is SentencePiece's default ``nmt_nfkc`` (NFKC plus whitespace cleanup), carried into
    the Hugging Face tokenizer as its precompiled character map.
    """
    import sentencepiece as spm

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
        raise AtmError(f"vocab_size must be an integer > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
    if not 0.0 < float(character_coverage) <= 1.0:
        raise AtmError(f"character_coverage must be in (0, 1], got {character_coverage!r}")
    if max_sentences is not None and (not isinstance(max_sentences, int) or max_sentences < 1):
        raise AtmError(f"max_sentences must be a positive integer or None, got {max_sentences!r}")
    if not isinstance(num_threads, int) or num_threads < 1:
        raise AtmError(f"num_threads must be a positive integer, got {num_threads!r}")

    sentences = _sentences(lines, max_sentences, seed)
    if not sentences:
        raise AtmError(f"no non-empty training line for the tokenizer in {out_dir}")

    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=writer,
            model_type="unigram",
            vocab_size=vocab_size,
            character_coverage=float(character_coverage),
            bos_id=SPECIAL_TOKENS["<s>"],
            pad_id=SPECIAL_TOKENS["<pad>"],
            eos_id=SPECIAL_TOKENS["</s>"],
            unk_id=SPECIAL_TOKENS["<unk>"],
            user_defined_symbols=["<mask>"],
            input_sentence_size=0,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        msg = str(err)
        m = _TOO_HIGH.search(msg)
        if m:
            raise AtmError(
                f"vocab_size={m.group(1)} is too large for the tokenizer training text "
                f"({len(sentences)} lines): at most {m.group(2)} pieces can be learnt from it; "
                f"set vocab_size <= {m.group(2)} or add text"
            ) from None
        raise AtmError(f"sentencepiece training failed: {msg.strip().splitlines()[0]}") from None
    model_bytes = writer.getvalue()

    tokenizer = _hf_tokenizer_from_proto(model_bytes, model_max_length)
    _check_special_ids(tokenizer, str(out_dir))
    _check_agreement(tokenizer, model_bytes, sentences)

    args = {
        "model_type": "unigram",
        "vocab_size": vocab_size,
        "seed": seed,
        "character_coverage": float(character_coverage),
        "max_sentences": max_sentences,
        "num_threads": num_threads,
        "n_sentences": len(sentences),
        "special_tokens": SPECIAL_TOKENS,
    }
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / SPM_MODEL_FILE).write_bytes(model_bytes)
        (tmp / TRAINING_ARGS_FILE).write_text(json.dumps(args, indent=2) + "\n")
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer saved with ``save_pretrained`` (by :func:`train_tokenizer` or a checkpoint).

    Only local files are read (``local_files_only=True``); nothing is downloaded.

    Raises:
        AtmError: ``path`` is not a directory, or holds no ``tokenizer.json`` /
            ``tokenizer_config.json``, or the files cannot be read.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise AtmError(f"{p}: tokenizer directory not found")
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise AtmError(f"{p}: no tokenizer.json or tokenizer_config.json (not a saved tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AtmError(f"{p}: cannot load tokenizer: {first}") from None


def tokenizer_stats(
    tokenizer, lines: Iterable[tuple[str, str]], *, batch_size: int = 1000
) -> dict[str, dict[str, float]]:
    """Per-language segmentation statistics of ``tokenizer`` on ``(language, text)`` pairs.

    For each language (the first element of a pair, e.g. ``"de-DE"``), over its non-empty texts:

    - ``split_ratio``: sub-tokens per whitespace-separated word (``len(text.split())``), i.e. the
      "fertility" of the tokenizer; special tokens (``<s>``, ``</s>``, ``<pad>``, ``<mask>``) are not
      counted, ``<unk>`` is.
    - ``unk_portion``: fraction of those sub-tokens that are ``<unk>`` (0 to 1).
    - ``n_words``, ``n_tokens``, ``n_lines``: the counts behind the ratios (as floats).

    Returns:
        ``{language: {"split_ratio", "unk_portion", "n_words", "n_tokens", "n_lines"}}``; languages
        appear in order of first occurrence.  Languages with only empty texts are left out.

    Raises:
        AtmError: an item is not a ``(language, text)`` pair of strings.
    """
    unk_id = tokenizer.unk_token_id
    skip = {i for i in tokenizer.all_special_ids if i != unk_id}
    counts: dict[str, list[int]] = {}

    def flush(batch: list[tuple[str, str]]) -> None:
        ids = tokenizer([t for _, t in batch], add_special_tokens=False)["input_ids"]
        for (lang, text), seq in zip(batch, ids):
            kept = [i for i in seq if i not in skip]
            c = counts.setdefault(lang, [0, 0, 0, 0])
            c[0] += len(text.split())
            c[1] += len(kept)
            c[2] += sum(1 for i in kept if i == unk_id)
            c[3] += 1

    batch: list[tuple[str, str]] = []
    for n, item in enumerate(lines):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise AtmError(f"tokenizer_stats item {n}: expected a (language, text) pair of strings, got {item!r:.80}")
        lang, text = item
        if not text.strip():
            continue
        batch.append((lang, text))
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    out: dict[str, dict[str, float]] = {}
    for lang, (n_words, n_tokens, n_unk, n_lines) in counts.items():
        out[lang] = {
            "split_ratio": n_tokens / n_words if n_words else float("nan"),
            "unk_portion": n_unk / n_tokens if n_tokens else 0.0,
            "n_words": float(n_words),
            "n_tokens": float(n_tokens),
            "n_lines": float(n_lines),
        }
    return out


def check_compatible(tokenizer, model_config: Any) -> None:
    """Check that ``tokenizer`` can feed a model with ``model_config`` (a config, a model or a mapping).

    Checks ``len(tokenizer) == vocab_size`` (the embedding rows) and equal pad token ids (RoBERTa's
    position ids and the embedding's ``padding_idx`` depend on it).

    Raises:
        AtmError: naming both vocabulary sizes (or both pad ids) and, where known, both paths.
    """
    cfg = getattr(model_config, "config", model_config)
    get = cfg.get if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
    vocab_size = get("vocab_size")
    n_tok = len(tokenizer)
    tok_name = getattr(tokenizer, "name_or_path", "") or "tokenizer"
    model_name = get("_name_or_path", "") or get("name_or_path", "") or "model"
    if vocab_size != n_tok:
        raise AtmError(
            f"tokenizer/model mismatch: tokenizer {tok_name} has {n_tok} tokens but model "
            f"{model_name} has vocab_size={vocab_size}"
        )
    pad = get("pad_token_id")
    if pad is not None and tokenizer.pad_token_id != pad:
        raise AtmError(
            f"tokenizer/model mismatch: tokenizer {tok_name} has pad_token_id={tokenizer.pad_token_id} "
            f"but model {model_name} has pad_token_id={pad}"
        )
