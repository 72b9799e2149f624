"""Tasks shared by the stages (below them: stages import tasks, never the reverse).

* :mod:`atm.tasks.massive`: MASSIVE intent classification + slot filling: samples, tokenization, batched
  prediction and the official scores, per utterance and per corpus.
"""
