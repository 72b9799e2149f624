# The two commands a newcomer needs:  make demo   and   make test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real data in the official layout (see README "Data"); ../shared/data on the project's machines.
ifneq ($(wildcard ../shared/data),)
export ATM_DATA_MIRROR ?= $(abspath ../shared/data)
endif

.PHONY: setup demo test clean alexatm-mini

$(BIN)/python:
	$(PY) -m venv $(VENV)

# DeepSpeed (the `deepspeed` extra) is an sdist that imports torch while building: it is built against the
# torch installed first (no build isolation, so it cannot pull another torch), compiling no ops ahead of time.
setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q setuptools wheel
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation 'deepspeed>=0.15'

# Stage 1 + Stage 2 teachers, a 4-trial Optuna sweep over distillation losses, evaluation of the
# Stage-1 checkpoints, and the perplexity / mask-filling vs XNLI correlation table. The demo's XNLI probe is
# cheaper than eval.xnli's defaults (DEMO_EVAL: 3,000 English training pairs, 2,000 test pairs of four
# languages), so that the whole demo stays within 15 minutes on 2 cores.
DEMO_EVAL ?= 'eval.xnli.languages=[en,de,fr,es]' eval.xnli.train_pairs=3000 eval.xnli.max_test_pairs_per_lang=2000
demo: setup
	$(BIN)/python -m atm.train +sweep=distill_losses -m
	$(BIN)/python -m atm.train stage=evaluate target=stage1 $(DEMO_EVAL)
	$(BIN)/python analysis/correlate_xnli.py
	@echo "Browse the runs: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db"

# The AlexaTM paper at small scale on the real data (README "The AlexaTM experiment"): every job of
# conf/experiment/alexatm_mini.yaml in one multirun, its distillation ablation (an Optuna grid over the
# intermediate student's recipe, reusing the experiment's teachers), then every analysis script, the seed-findings
# verdicts (analysis/findings.py) last; own store in
# $(ALEXATM_DIR). ALEXATM_ARGS (e.g. alexatm.steps.stage1=2000) reach both commands, so the ablation's
# teachers are the experiment's.
ALEXATM_DIR ?= .atm/alexatm_mini
ALEXATM_ARGS ?=
alexatm-mini: setup
	mkdir -p $(ALEXATM_DIR)
	cd $(ALEXATM_DIR) && $(abspath $(BIN))/python -m atm.train +experiment=alexatm_mini $(ALEXATM_ARGS) -m
	cd $(ALEXATM_DIR) && $(abspath $(BIN))/python -m atm.train +experiment=alexatm_mini +sweep=alexatm_mini_ablation \
	  $(ALEXATM_ARGS) -m
	cd $(ALEXATM_DIR) && for script in correlate_xnli scaling_table stage2_effect distillation_table ablation_report findings; do \
	  $(abspath $(BIN))/python $(CURDIR)/analysis/$$script.py || exit 1; done

test: setup
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf .atm mlruns mlflow.db optuna.db analysis/out
