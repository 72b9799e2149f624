"""Stage-level glue shared by several stages: the MLM training loop wiring of pretraining and distillation
(corpus -> batches -> ``fit`` -> checkpoints -> held-out perplexity and cost) and logging a trained model.
Libraries (probes, tasks, models) live below the stages, not here."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import mlflow
import torch
from omegaconf import DictConfig

from atm import sweeps, tracking
from atm.data import corpora
from atm.data.sources import check_sources
from atm.data.collate import batch_stream, mlm_collator, mlm_examples
from atm.engine.deepspeed import world
from atm.engine.loop import LossFn, fit
from atm.engine.state import run_state_dir
from atm.errors import AtmError
from atm.models import cost
from atm.models.encoder import save_checkpoint, training_dropout
from atm.probes.perplexity import heldout_perplexities


def count_at_least(value, key: str, low: int = 1, *, nullable: bool = False) -> None:
    """``value`` must be an integer >= ``low`` (or null when ``nullable``).

    Raises:
        AtmError: ``<key>=<value> must be an integer >= <low>``.
    """
    if value is None and nullable:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise AtmError(f"{key}={value!r} must be an integer >= {low}" + (" or null" if nullable else ""))


def probability(value, key: str, *, low_open: bool = True, high_open: bool = True, nullable: bool = False) -> None:
    """``value`` must be a probability in the interval (0, 1) (``low_open``/``high_open`` False: the bound is
    included), or null when ``nullable``.

    Raises:
        AtmError: ``<key>=<value> must be a probability in (0, 1)``.
    """
    if value is None and nullable:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise AtmError(f"{key}={value!r} must be a probability in {interval}" + (" or null" if nullable else ""))


def check_data(cfg: DictConfig) -> None:
    """Config-time checks of the ``data`` group every stage reads (before anything trains).

    Raises:
        AtmError: ``data.max_seq_len`` < 3, ``data.packing`` not a boolean, a ``max_lines_per_source`` cap that
            is not null or >= 1, ``data.heldout.max_lines_per_lang`` < 1, ``data.shards.workers`` not null or >= 1,
            ``data.loader.workers`` < 0, ``data.loader.prefetch`` < 1; bad ``data.<kind>.paths``/``hf`` (a glob
            matching no file, an unreadable file, a JSON-lines file without the text field:
            :func:`atm.data.sources.check_sources`).
    """
    length = cfg.data.max_seq_len
    if isinstance(length, bool) or not isinstance(length, int) or length < 3:
        raise AtmError(f"data.max_seq_len={length!r} must be an integer >= 3 (<s>, a token, </s>)")
    packing = cfg.data.get("packing", True)
    if not isinstance(packing, bool):
        raise AtmError(f"data.packing={packing!r} must be true or false")
    for corpus in ("written", "spoken"):
        count_at_least((cfg.data.get(corpus) or {}).get("max_lines_per_source"),
                       f"data.{corpus}.max_lines_per_source", nullable=True)
    count_at_least((cfg.data.get("heldout") or {}).get("max_lines_per_lang", 1), "data.heldout.max_lines_per_lang")
    count_at_least((cfg.data.get("shards") or {}).get("workers"), "data.shards.workers", nullable=True)
    loader = cfg.data.get("loader") or {}
    count_at_least(loader.get("workers", 0), "data.loader.workers", 0)
    count_at_least(loader.get("prefetch", 2), "data.loader.prefetch")
    check_sources(cfg.data)


def check_locales(cfg: DictConfig, keys: Sequence[str] = ("locales", "eval_locales")) -> None:
    """Every locale named in ``finetune.<key>`` for ``key`` in ``keys`` is a MASSIVE locale (read from the data
    mirror's archive listing).

    Raises:
        AtmError: ``finetune.<key>: unknown MASSIVE locale(s) ... (available: ...)``, or the archive is missing.
    """
    from atm.data.massive import massive_locales

    available = None
    for key in keys:
        values = cfg.finetune.get(key)
        if values is None:
            continue
        if isinstance(values, str):
            values = [values]
        available = available if available is not None else massive_locales()
        unknown = [str(loc) for loc in values if loc not in available]
        if unknown:
            raise AtmError(f"finetune.{key}: unknown MASSIVE locale(s) {', '.join(unknown)} "
                           f"(available: {', '.join(available)})")


def check_mlm_data(cfg: DictConfig) -> None:
    """Config-time checks of the MLM data and stage keys this module reads (before anything trains).

    Raises:
        AtmError: as :func:`check_data`; ``stage.corpus`` not written/spoken, ``stage.mlm_probability`` not in
            (0, 1), ``stage.dropout`` not null or in [0, 1), ``eval.perplexity.max_lines_per_lang`` < 1.
    """
    check_data(cfg)
    corpus = cfg.stage.get("corpus")
    if corpus not in ("written", "spoken"):
        raise AtmError(f"stage.corpus={corpus!r} must be 'written' or 'spoken'")
    probability(cfg.stage.get("mlm_probability"), "stage.mlm_probability")
    dropout = cfg.stage.get("dropout")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0.0 <= dropout < 1.0):
        raise AtmError(f"stage.dropout={dropout!r} must be null (the model's own) or a probability in [0, 1)")
    perplexity = (cfg.get("eval") or {}).get("perplexity") or {}
    count_at_least(perplexity.get("max_lines_per_lang", 1), "eval.perplexity.max_lines_per_lang")


def mlm_stream(cfg: DictConfig, tokenizer):
    """The MLM batch stream of ``stage.corpus``: its token shard (:func:`atm.data.corpora.corpus_shard`, tokenized
    once and memory-mapped), packed into ``data.max_seq_len`` blocks (``data.packing``, default) or one padded
    example per line, masked by :func:`mlm_collator`, read by ``data.loader.workers`` processes. Logs
    ``data/train_lines``, ``data/train_tokens`` (sub-tokens, specials excluded) and ``data/train_examples``."""
    check_mlm_data(cfg)
    corpus = corpora.corpus_shard(cfg.stage.corpus, cfg.data, tokenizer, cfg.seed)
    examples = mlm_examples(corpus, tokenizer, cfg.data.max_seq_len, cfg.data.get("packing", True))
    mlflow.log_metrics({"data/train_lines": corpus.n_lines, "data/train_tokens": corpus.n_tokens,
                        "data/train_examples": len(examples)})
    loader = cfg.data.get("loader") or {}
    return batch_stream(examples, cfg.trainer.batch_size, mlm_collator(tokenizer, cfg.stage.mlm_probability),
                        cfg.seed, workers=loader.get("workers", 0), prefetch=loader.get("prefetch", 2))


def train_mlm(cfg: DictConfig, module: torch.nn.Module, model, tokenizer, loss_fn: LossFn,
              callbacks: Sequence[Callable[[int], None]] = ()) -> dict[str, float]:
    """Train ``module`` (which contains ``model``) with ``loss_fn`` on MLM batches of ``stage.corpus``
    (:func:`mlm_stream`), with ``model``'s dropout set to ``stage.dropout`` while it trains (null: the
    model's own; the saved checkpoints keep the model config's values, so fine-tuning is unchanged).

    Saves ``model`` + ``tokenizer`` every ``trainer.save_every`` steps (``checkpoints/step-<N>``) and at the
    end (``checkpoint``), then scores held-out written and spoken perplexity and measures ``model``'s cost
    (:func:`atm.models.cost.measure`). In a sweep with a pruner, the perplexities are also scored and
    reported every ``report_every`` steps (:func:`atm.sweeps.pruning_callbacks`). Returns the final metrics.
    """
    stream = mlm_stream(cfg, tokenizer)

    def evaluate() -> dict[str, float]:
        return heldout_perplexities(model, tokenizer, cfg.data, cfg.eval.perplexity.max_lines_per_lang)

    pruning = sweeps.pruning_callbacks(cfg, module, evaluate)  # [] outside a pruned sweep
    with training_dropout(model, cfg.stage.get("dropout")):
        summary = fit(module, stream, loss_fn, cfg.trainer,
                      callbacks=[checkpoint_logger(model, tokenizer, cfg.trainer), *callbacks, *pruning],
                      desc=cfg.stage.name, state_dir=run_state_dir(cfg.trainer))
    log_model(model, tokenizer, tracking.CHECKPOINT)
    metrics = heldout_perplexities(model, tokenizer, cfg.data, cfg.eval.perplexity.max_lines_per_lang)
    mlflow.log_metrics(metrics, step=cfg.trainer.max_steps)
    return {**summary, **metrics, **cost.measure(model, tokenizer, cfg)}


def log_model(model, tokenizer, artifact_path: str) -> None:
    """Save ``model`` + ``tokenizer`` with ``save_pretrained`` and log them under ``artifact_path`` (on rank 0
    only, when several processes train)."""
    if world()[0] != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        save_checkpoint(model, tokenizer, out)
        tracking.log_checkpoint(out, artifact_path)


def checkpoint_logger(model, tokenizer, trainer_cfg: DictConfig) -> Callable[[int], None]:
    """A ``fit`` callback logging an intermediate checkpoint ``checkpoints/step-<N>`` every
    ``trainer.save_every`` steps (before the last step, which :func:`train_mlm` saves as ``checkpoint``)."""

    def on_step(step: int) -> None:
        every = trainer_cfg.get("save_every")
        if every and step % every == 0 and step < trainer_cfg.max_steps:
            log_model(model, tokenizer, f"{tracking.CHECKPOINTS}/step-{step:06d}")

    return on_step
