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
STAGE_ARGS = --preset $(DATASET) $(ARGS)
# DATA_ROOT is STEGO's pytorch_data_dir (holding cocostuff/, cityscapes/, potsdam/); WEIGHTS_DIR holds the
# official DINO checkpoints. The dataset presets read them through these variables.
ifneq ($(DATA_ROOT),)
export STEGOPIPE_DATA_ROOT := $(abspath $(DATA_ROOT))
endif
ifneq ($(WEIGHTS_DIR),)
export STEGOPIPE_WEIGHTS_DIR := $(abspath $(WEIGHTS_DIR))
endif

.PHONY: help install test test-slow test-faults demo bench bench-scale clean prepare extract knn reduce train-head probe \
	evaluate report plan table2 fig3 fig4 hnne predict nightly import-stego

help: ## List the targets (and, once installed, the METHOD values)
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'
	@if [ -x $(STEGO) ]; then echo "METHOD (projection.method):"; $(STEGO) methods | sed 's/^/  /'; fi

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

.PHONY: test-slurm
test-slurm: install ## Run the tests on a real one-node SLURM that they start (root; apt-get installs slurm-wlm, munge)
	$(PY) -m pytest -q -m slurm tests/test_slurm.py

demo: install ## Run the whole pipeline on the built-in synthetic dataset and write a report
	$(STEGO) run demo $(ARGS)

prepare: install ## Index and validate a split (DATASET, SPLIT, DATA_ROOT)
	$(STEGO) run prepare $(STAGE_ARGS) split=$(SPLIT)

extract: install ## Extract frozen DINO tokens of a split into the cache (DATASET, SPLIT, DATA_ROOT, WEIGHTS_DIR)
	$(STEGO) run extract $(STAGE_ARGS) split=$(SPLIT)

knn: install ## kNN pairs of the train tokens (DATASET)
	$(STEGO) run knn $(STAGE_ARGS)

reduce: install ## Fit a reducer on the train tokens (METHOD, DIM; `stegopipe methods` lists them)
	$(STEGO) run reduce $(STAGE_ARGS) projection.method=$(METHOD) $(if $(DIM),projection.dim=$(DIM))

train-head: install ## Train a STEGO head from the cache (DATASET; preset = the paper's Table 1 config)
	$(STEGO) run train-head $(STAGE_ARGS)

probe: install ## Train linear + cluster probes on a projection (METHOD, DIM)
	$(STEGO) run probe $(STAGE_ARGS) projection.method=$(METHOD) $(if $(DIM),projection.dim=$(DIM))

evaluate: install ## Evaluate probes on the val split (METHOD, DIM, CRF=1 adds dense CRF)
	$(STEGO) run evaluate $(STAGE_ARGS) projection.method=$(METHOD) $(if $(DIM),projection.dim=$(DIM)) \
		evaluate.crf=$(if $(filter 1,$(CRF)),true,false)

plan: install ## What an experiment would build: cached / missing / running, sizes, missing data or weights (EXPERIMENT)
	$(STEGO) plan $(EXPERIMENT) $(ARGS)

report: install ## Run an experiment and write its report to reports/<experiment>/ (EXPERIMENT)
	$(STEGO) run $(EXPERIMENT) $(ARGS)

table2: install ## The paper's Table 2 (needs DATA_ROOT with the three datasets, WEIGHTS_DIR with DINO weights)
	$(STEGO) run table2 $(ARGS)

fig3: install ## The paper's Figure 3: cumulative explained variance of PCA per dataset
	$(STEGO) run fig3 $(ARGS)

fig4: install ## The paper's Figure 4: STEGO vs PCA vs RP vs DINO across dims
	$(STEGO) run fig4 $(ARGS)

hnne: install ## The supplementary h-NNE comparison (Cityscapes)
	$(STEGO) run hnne $(ARGS)

import-stego: install ## Import a released STEGO checkpoint as a train-head artifact (CKPT=path)
	$(STEGO) import-stego $(CKPT) $(ARGS)

predict: install ## Segment images with a STEGO head (HEAD=<id>, IMAGES="a.jpg b.jpg", EVAL=<evaluate id>, OUT=)
	$(STEGO) predict --head $(HEAD) $(if $(EVAL),--eval $(EVAL)) --out $(or $(OUT),predictions) $(ARGS) $(IMAGES)

nightly: install ## Cron-style nightly run of EXPERIMENT (flock, dated log in logs/, gc dry run)
	scripts/nightly-cron.sh $(EXPERIMENT) $(ARGS)

bench: install ## Run every benchmark and print one table (benchmarks/results/)
	$(PY) benchmarks/run_all.py $(ARGS)

bench-scale: install ## Paper-shaped rehearsal: every stage on N, 2N, 4N token stores, 4N = 1.2x RAM (ARGS="--n 2048": mid-size)
	$(PY) benchmarks/scale.py $(ARGS)

clean: ## Remove artifacts and reports (keeps .venv)
	rm -rf artifacts reports .pytest_cache
