"""Data layer: where the official data comes from and how each format is read.

* :mod:`atm.data.fetch` -- cache / mirror / download resolution of data files (``ATM_DATA_DIR``,
  ``ATM_DATA_MIRROR``), with checksums.
* :mod:`atm.data.text` -- shared plain/gzip text I/O and ``file:line`` error locations.
* :mod:`atm.data.massive`, :mod:`atm.data.ud`, :mod:`atm.data.xnli`, :mod:`atm.data.slurp` -- readers.
* :mod:`atm.data.corpora` -- pretraining corpora, held-out text and the evaluation-text filter.
"""
