# stegopipe — make targets. `make help` lists them. Every target sets up .venv first if needed.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STEGO := $(VENV)/bin/stegopipe
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml 2>/dev/null | cut -c1-16)
export STEGOPIPE_ROOT ?= $(CURDIR)/artifacts

# Stage parameters (override on the command line: make extract DATASET=cocostuff27 DATA_ROOT=/data/cocostuff)
DATASET ?= synthetic
SPLIT ?= train
DATA_ROOT ?=
WEIGHTS_DIR ?=
METHOD ?= pca
DIM ?=
CRF ?= 0
EXPERIMENT ?= demo
ARGS ?=
STAGE_ARGS = --preset $(DATASET) $(if $(DATA_ROOT),dataset.root=$(DATA_ROOT)) \
	$(if $(WEIGHTS_DIR),backbone.weights_dir=$(WEIGHTS_DIR)) $(ARGS)

.PHONY: help install test test-slow test-faults demo bench clean prepare

help: ## List the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv (Python 3.11) and install stegopipe editable with pinned deps (idempotent)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,slurm]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: install ## Run the default test suite (fast; slow and long fault tests excluded)
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

test-slow: install ## Run the slow tests only
	$(PY) -m pytest -q -m slow

test-faults: install ## Run the whole fault-injection suite
	$(PY) -m pytest -q -m "faults or faults_full"

demo: install ## Run the whole pipeline on the built-in synthetic dataset and write a report
	$(STEGO) run demo $(ARGS)

prepare: install ## Index and validate a split (DATASET, SPLIT, DATA_ROOT)
	$(STEGO) run prepare $(STAGE_ARGS) split=$(SPLIT)

clean: ## Remove artifacts and reports (keeps .venv)
	rm -rf artifacts reports .pytest_cache
