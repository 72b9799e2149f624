# The two commands a newcomer needs:  make demo   and   make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real data in the official layout (see README "Data"); ../shared/data on the project's machines.
ifneq ($(wildcard ../shared/data),)
export ATM_DATA_MIRROR ?= $(abspath ../shared/data)
endif

.PHONY: setup demo test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'

# Stage 1 + Stage 2 teachers, a 4-trial Optuna sweep over distillation losses, evaluation of the
# Stage-1 checkpoints, and the perplexity / mask-filling vs XNLI correlation table.
demo: setup
	$(BIN)/python -m atm.train +sweep=distill_losses -m
	$(BIN)/python -m atm.train stage=evaluate target=stage1
	$(BIN)/python analysis/correlate_xnli.py
	@echo "Browse the runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db"

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf .atm mlruns mlflow.db optuna.db analysis/out
