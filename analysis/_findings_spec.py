"""The seed findings of :mod:`analysis.findings` and its decision rule: what each finding claims, where, the
statistic atm measures for it with its claimed sign and unit (:data:`SPECS`), and how an interval becomes a
verdict (:func:`verdict`) or a sample-size estimate (:func:`required_sample`). Fixed before any result was
looked at; see the module docstring of :mod:`analysis.findings` for the definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from atm.stats import Interval

JOB = "python -m atm.train +experiment=alexatm_mini experiment/alexatm_mini_jobs@_global_={}"
ABLATION_JOB = "python -m atm.train +experiment=alexatm_mini +sweep=alexatm_mini_ablation -m"
REPRODUCED, CONTRADICTED, INCONCLUSIVE, MISSING = "reproduced", "contradicted", "inconclusive", "missing"
FULL = ("full", False)  # (finetune.setting, frozen encoder) of the MASSIVE comparisons
LOGIT, INTERMEDIATE, MI_ALPHA = "distill.logit.loss", "distill.intermediate.loss", "mi_alpha"
TABLE_COLUMNS = ["finding", "claim", "source_figure", "atm_figure", "verdict", "required_n", "runs"]
CSV_COLUMNS = ["finding", "claim", "source_figure", "statistic", "atm_figure", "estimate", "ci_low", "ci_high",
               "verdict", "required_n", "unit", "n", "run_ids", "note", "job"]


@dataclass(frozen=True)
class Spec:
    """A seed finding: what is claimed, where, the statistic atm measures, its claimed sign and unit."""

    id: str
    claim: str
    source: str
    statistic: str
    direction: int  # +1: the claim is statistic > 0; -1: statistic < 0
    unit: str
    jobs: tuple[str, ...]
    fmt: str  # "r" (correlation), "rel" (relative change), "pp" (difference of fractions), "eta2"


SPECS = {s.id: s for s in (
    Spec("F1a", "perplexity falls as XNLI accuracy rises across checkpoints",
         "AlexaTM Table 3: perplexity correlates negatively with XNLI accuracy",
         "Pearson r, eval/perplexity/written vs eval/xnli/avg_accuracy (Fisher z)", -1, "checkpoints",
         ("eval_stage1_s", "eval_stage1_m", "eval_stage1_l"), "r"),
    Spec("F1b", "mask filling rises as XNLI accuracy rises across checkpoints",
         "AlexaTM Table 3: mask-filling accuracy correlates positively with XNLI accuracy",
         "Pearson r, eval/mask_fill/noun_accuracy vs eval/xnli/avg_accuracy (Fisher z)", +1, "checkpoints",
         ("eval_stage1_s", "eval_stage1_m", "eval_stage1_l"), "r"),
    Spec("F2a", "Stage-2 in-domain pretraining lowers intent error",
         "AlexaTM: -3.86% relative IC error",
         "relative intent error change, largest Stage-2 vs its Stage-1 teacher, pooled over locales", -1,
         "test utterances per locale", ("ft_stage1_l", "ft_stage2_l"), "rel"),
    Spec("F2b", "Stage-2 in-domain pretraining lowers slot error",
         "AlexaTM: -7.01% relative SF error",
         "relative slot-F1 error change, largest Stage-2 vs its Stage-1 teacher, pooled over locales", -1,
         "test utterances per locale", ("ft_stage1_l", "ft_stage2_l"), "rel"),
    Spec("F3", "a distilled student beats a same-size model trained without distillation",
         "AlexaTM: 17M student beats XLM-R Base by 4.23%, DistilBERT by 6.14%",
         "relative exact-match error change, final student vs same-size from-scratch model, pooled over locales",
         -1, "test utterances per locale", ("ft_final", "ft_stage2_s"), "rel"),
    Spec("F4a", "a larger teacher has lower perplexity",
         "AlexaTM: perplexity falls with teacher size",
         "relative change of geometric-mean perplexity (written + spoken languages), largest vs smallest Stage-1 "
         "teacher (t over languages)", -1, "languages", ("eval_stage1_s", "eval_stage1_l"), "rel"),
    Spec("F4b", "a larger teacher gives better downstream accuracy",
         "AlexaTM: downstream accuracy rises with teacher size",
         "MASSIVE intent accuracy difference, largest minus smallest Stage-1 teacher, pooled over locales", +1,
         "test utterances per locale", ("ft_stage1_s", "ft_stage1_l"), "pp"),
    Spec("F5a", "the intermediate-representation objective matters more than the logit loss",
         "Distiller (He et al. 2021): the intermediate objective is the most important design choice",
         "eta^2(distill.intermediate.loss) - eta^2(distill.logit.loss) of the ablation objective (bootstrap over "
         "trials)", +1, "ablation trials", ("ablation",), "eta2"),
    Spec("F5b", "MI-alpha is among the best intermediate objectives",
         "Distiller (He et al. 2021): MI-alpha is among the best objectives",
         "MI-alpha's mean objective against the mean of the other objectives' means, relative to it, positive = "
         "MI-alpha better (bootstrap over trials)", +1, "ablation trials", ("ablation",), "rel"),
)}


@dataclass
class Measure:
    """What one finding rests on.

    Attributes:
        interval: the statistic and its 95% interval (None: not computable; the note says why).
        power: the interval :func:`atm.stats.required_n` scales (default ``interval``); ``power_offset`` is added
            to its result (3 for a Fisher-z interval, whose standard error is 1/sqrt(n - 3)).
        run_ids: the runs it rests on; ``missing``: they are not there (then ``note`` names what is lacking).
    """

    interval: Interval | None = None
    power: Interval | None = None
    power_offset: float = 0.0
    run_ids: list[str] = field(default_factory=list)
    note: str = ""
    missing: bool = False


def verdict(interval: Interval | None, direction: int) -> str:
    """The decision rule of the module docstring: ``reproduced`` when the interval excludes zero in the claimed
    ``direction`` (+1 / -1), ``contradicted`` when it excludes zero in the other, else ``inconclusive``."""
    if interval is None or not (math.isfinite(interval.lo) and math.isfinite(interval.hi)):
        return INCONCLUSIVE
    if (interval.lo > 0 and direction > 0) or (interval.hi < 0 and direction < 0):
        return REPRODUCED
    if interval.lo > 0 or interval.hi < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def required_sample(measure: Measure) -> float:
    """Sample size (in the finding's unit) a decision would need: :func:`atm.stats.required_n` of the measure's
    power interval, rounded up; NaN when undefined."""
    from atm import stats

    power = measure.power or measure.interval
    if power is None:
        return math.nan
    n = stats.required_n(power)
    return float(math.ceil(n + measure.power_offset)) if math.isfinite(n) else n
