# medtransfer: every target sets itself up; `make fit` and `make test` work as the first command on a clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
CONFIG ?= configs/pneumonia_effnet_lite0.yaml
HOST ?= 127.0.0.1
PORT ?= 5000

# The shipped data copy beside the repository, when there is one; otherwise the CLI downloads (MD5-checked).
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(origin MEDTRANSFER_DATA_DIR),undefined)
ifneq ($(wildcard $(SHARED_DATA)/pneumoniamnist.npz),)
export MEDTRANSFER_DATA_DIR := $(SHARED_DATA)
endif
endif

.PHONY: setup fit test test-all test-faults ui docs lint format clean

setup: $(STAMP) ## create .venv and install medtransfer with its dev extras (skipped when up to date)

# The last step stores the --help of fit, validate, test, serve and baseline (commands/help_cache.py) in one
# process, so that the first `medtransfer fit --help` is already instant.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -c 'from medtransfer.entry import warm_help_cache; warm_help_cache()'
	touch $(STAMP)

fit: setup ## train the default config, then test its best checkpoint; all tracked in mlruns/
	$(BIN)/medtransfer fit --config $(CONFIG)

test: setup ## the fast tier: every package's behaviour, without the slow CLI fits and servers or the fault scenarios
	$(BIN)/pytest -m "not slow and not faults"

test-all: setup ## everything: the fast tier, the slow CLI fits and servers, and the fault scenarios (what CI runs)
	$(BIN)/pytest -m ""

test-faults: setup ## the whole fault suite (tests/faults), including the long `faults`-marked kill/resume cases
	$(BIN)/pytest tests/faults -m ""

ui: setup ## the MLflow UI over mlruns/ on http://127.0.0.1:5000, its link opening the runs table with the headline metrics
	$(BIN)/python -m medtransfer.tracking.ui http://$(HOST):$(PORT) sqlite:///mlruns/mlflow.db medtransfer
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host $(HOST) --port $(PORT)

# The documentation site: MkDocs Material (Markdown pages like the rest of the repository) with mkdocstrings
# (API pages from the docstrings) and mkdocs-jupyter (the quickstart notebook, shown as committed, never run);
# docs/hooks/cli_reference.py writes the CLI reference from every command's --help. Strict: a warning fails it.
$(DOCS_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -e '.[dev,docs]'
	touch $(STAMP) $(DOCS_STAMP)

docs: $(DOCS_STAMP) ## build the documentation site into site/ (open site/index.html)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: setup
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

clean: ## remove tracked runs, checkpoints and caches (keeps .venv)
	find mlruns -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -exec rm -rf {} +
