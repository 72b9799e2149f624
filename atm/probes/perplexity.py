"""MLM perplexity of an encoder on held-out text, with fixed masks (comparable along a training run).

``exp`` of the mean negative log-likelihood (nats) of the masked tokens, in tokens. Used by every MLM stage
(held-out written and spoken perplexity after training, and while a sweep prunes), by the distillation's
plateau criterion and by the ``evaluate`` stage.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from atm import metrics as M
from atm.data import corpora
from atm.data.collate import EVAL_BATCH, batches, mlm_collator, tokenize_lines
from atm.engine.loop import to_device
from atm.models.encoder import mlm_forward


@torch.no_grad()
def mlm_perplexity(model, tokenizer, lines: list[str], max_seq_len: int, seed: int = 0) -> float:
    """MLM perplexity ``exp(sum NLL / n)`` over the masked tokens of ``lines`` with a fixed-seed 15% masking
    (the same masks for every checkpoint, so values are comparable along a training run)."""
    examples = tokenize_lines(tokenizer, lines, max_seq_len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches(examples, EVAL_BATCH, mlm_collator(tokenizer, 0.15, seed=seed)):
        batch = to_device(batch, device)
        masked = batch["labels"] != -100
        logits = mlm_forward(model, batch["input_ids"], batch["attention_mask"], masked)["logits"]
        nll, n = M.masked_lm_nll(logits, batch["labels"][masked])
        total, count = total + nll, count + n
    return M.perplexity(total, count)


def heldout_perplexities(model, tokenizer, data_cfg: DictConfig, max_lines_per_lang: int) -> dict[str, float]:
    """``eval/perplexity/written`` (UD dev sentences) and ``eval/perplexity/spoken`` (MASSIVE dev utterances)."""
    written = [line.text for line in corpora.heldout_written(max_lines_per_lang)]
    spoken = [line.text for line in corpora.heldout_spoken(max_lines_per_lang)]
    return {"eval/perplexity/written": mlm_perplexity(model, tokenizer, written, data_cfg.max_seq_len),
            "eval/perplexity/spoken": mlm_perplexity(model, tokenizer, spoken, data_cfg.max_seq_len)}
