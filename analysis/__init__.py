"""atm's analysis scripts (``python analysis/<script>.py``): tables, plots and verdicts rebuilt from the MLflow
store. Installed with atm (``pip install -e .``), so the scripts import their shared modules (``_store``,
``_runs``, ``_output``, ...) as ``analysis.*`` from any working directory."""
