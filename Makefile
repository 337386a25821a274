# chimera-ssm: install / test skeleton. Everything runs inside .venv (made by `make install`).
SHELL := /bin/bash
PY    := .venv/bin/python

.DEFAULT_GOAL := help
.PHONY: help install test test-slow lint bench clean

help:  ## list targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  %-22s %s\n", $$1, $$2}'

install:  ## create/refresh .venv (idempotent; fast when nothing changed)
	bash scripts/install.sh

test: install  ## run the default test suite (slow tests deselected)
	$(PY) -m pytest -q

test-slow: install  ## run only the tests marked slow
	$(PY) -m pytest -q -m slow

lint: install  ## ruff check
	$(PY) -m ruff check .

bench: install  ## mixer benchmark (scripts/bench_mixer.py)
	$(PY) scripts/bench_mixer.py

clean:  ## remove caches and build debris (keeps .venv; `rm -rf .venv` for a fresh install)
	find . -path ./.venv -prune -o -type d -name __pycache__ -print0 | xargs -0 rm -rf
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info

# --- paper tables (reproduce-*) ---
# Each target sweeps one paper table with Hydra (conf/experiment/table*.yaml), then tabulates it
# next to the paper's numbers (scripts/aggregate_tables.py -> results/table*/<preset>/).
#   PRESET=paper  ImageNet-1k at DATA_ROOT (ImageFolder: train/, val/), the paper's models/recipe
#   PRESET=tiny   Fashion-MNIST, tiny models, a budget for 2 CPU cores (conf/preset/tiny.yaml)
#   SEEDS=n       seeds 0..n-1 per sweep member (default: 3 for tiny, 1 for paper)
#   TRAIN_ARGS    extra Hydra overrides, e.g. TRAIN_ARGS="trainer=ddp logger=wandb"
PRESET     ?= paper
SEEDS      ?= $(if $(filter tiny,$(PRESET)),3,1)
DATA_ROOT  ?= $(or $(IMAGENET_ROOT),data/imagenet)
TRAIN_ARGS ?=
RUN_STAMP  := $(shell date +%Y%m%d-%H%M%S)
.PHONY: reproduce-table2 reproduce-table3 reproduce-table6

define reproduce_table
	@set -euo pipefail; \
	case "$(PRESET)" in paper|tiny) ;; *) echo "error: PRESET must be paper or tiny, got '$(PRESET)'" >&2; exit 2;; esac; \
	[[ "$(SEEDS)" =~ ^[1-9][0-9]*$$ ]] || { echo "error: SEEDS must be a positive integer, got '$(SEEDS)'" >&2; exit 2; }; \
	data_arg=""; \
	if [[ "$(PRESET)" == paper ]]; then \
		if [[ ! -d "$(DATA_ROOT)/train" || ! -d "$(DATA_ROOT)/val" ]]; then \
			echo "error: ImageNet-1k not found at DATA_ROOT=$(DATA_ROOT) (needs $(DATA_ROOT)/train/<class>/ and $(DATA_ROOT)/val/<class>/)." >&2; \
			echo "  Either point DATA_ROOT (or IMAGENET_ROOT) at an ImageNet ImageFolder:  make $@ DATA_ROOT=/path/to/imagenet" >&2; \
			echo "  or run the small CPU version on Fashion-MNIST:                         make $@ PRESET=tiny" >&2; \
			exit 2; \
		fi; \
		data_arg="data.root=$(DATA_ROOT)"; \
	fi; \
	runs=results/table$(1)/runs/$(PRESET)/$(RUN_STAMP); \
	echo "==> Table $(1), preset $(PRESET), seeds 0..$$(( $(SEEDS) - 1 )) -> $$runs"; \
	start=$$SECONDS; \
	$(PY) scripts/train.py -m experiment=table$(1) preset=$(PRESET) "seed=range(0,$(SEEDS))" \
		hydra.sweep.dir=$$runs $$data_arg $(TRAIN_ARGS); \
	echo "==> sweep done in $$(( SECONDS - start )) s"; \
	$(PY) scripts/aggregate_tables.py --table $(1) --runs $$runs --out results/table$(1)/$(PRESET); \
	echo "==> Table $(1) ($(PRESET)) done in $$(( SECONDS - start )) s"
endef

reproduce-table2: install  ## Table 2: Chimera-ViT-B vs ViT-B (PRESET=paper|tiny SEEDS=n DATA_ROOT=...)
	$(call reproduce_table,2)

reproduce-table3: install  ## Table 3: 2D DAG vs flattened fwd+rev vs fwd (PRESET, SEEDS, DATA_ROOT)
	$(call reproduce_table,3)

reproduce-table6: install  ## Table 6: B/C sharing none/complete/rowwise/diagonal (PRESET, SEEDS, DATA_ROOT)
	$(call reproduce_table,6)
