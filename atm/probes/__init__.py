"""Probes of a pretrained encoder, shared by the stages (below them: stages import probes, never the reverse).

* :mod:`atm.probes.perplexity`: MLM perplexity with fixed masks (held-out written and spoken text);
* :mod:`atm.probes.mask_fill`: whole-word mask filling (top-1, top-10, reciprocal rank per word);
* :mod:`atm.probes.xnli`: the XNLI pair classifier, trained on English and scored zero-shot (several
  seeds, intervals, degenerate-probe flags).
"""
