# chimera-ssm: install / test skeleton. Everything runs inside .venv (made by `make install`).
SHELL := /bin/bash
PY    := .venv/bin/python

.DEFAULT_GOAL := help
.PHONY: help install test test-slow lint bench bench-models bench-text bench-graphs clean

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

bench-models: install  ## whole models: Chimera-ViT vs ViT at 224 and the tiny sizes (scripts/bench_models.py)
	$(PY) scripts/bench_models.py

bench-text: install  ## one Chimera DAG / UG text layer vs one BERT layer (scripts/bench_text_layers.py)
	$(PY) scripts/bench_text_layers.py

bench-graphs: install  ## graph layers vs nodes: Chimera exact/finite sum/DAG vs GPS vs GCN (scripts/bench_graphs.py)
	$(PY) scripts/bench_graphs.py

clean:  ## remove caches and build debris (keeps .venv; `rm -rf .venv` for a fresh install)
	find . -path ./.venv -prune -o -type d -name __pycache__ -print0 | xargs -0 rm -rf
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info

# --- paper tables -------------------------------------------------------------------------
# `make reproduce-<table>` runs the table's sweep (conf/experiment/<family>/<table>.yaml, its
# `table:` node says which member is which row) and tabulates it beside the paper's numbers:
#   PRESET=paper|tiny  the paper's data/models/budget, or the small CPU version
#   SEEDS=0,1,2 | n    seeds (default: the table's own list for the preset)
#   TRAIN_ARGS         extra Hydra overrides, e.g. TRAIN_ARGS="trainer=ddp logger=wandb"
#   DATA_ROOT          passed as data.root (vision paper preset: the ImageNet ImageFolder; the
#                      vision data config also reads IMAGENET_ROOT itself)
# Runs: results/runs/<table>/<preset>/<member>/seed<k>/ (re-running skips finished members and
# resumes unfinished ones); table: results/tables/<table>/<preset>/. The README quotes
# results/reference/, which only `make promote-<table>` changes.
PRESET     ?= paper
SEEDS      ?=
# runs at a time (one torch thread each): two for the tiny presets, one otherwise
JOBS       ?= $(if $(filter tiny,$(PRESET)),2,1)
TRAIN_ARGS ?=
DATA_ROOT  ?=
.PHONY: reproduce-% promote-%

reproduce-%: install  ## reproduce a paper table: make reproduce-table2 PRESET=tiny [SEEDS=..] [JOBS=2]
	$(PY) scripts/reproduce.py $* --preset $(PRESET) $(if $(SEEDS),--seeds $(SEEDS)) --jobs $(JOBS) -- \
		$(if $(DATA_ROOT),data.root=$(DATA_ROOT)) $(TRAIN_ARGS)

promote-%:  ## copy results/tables/<table>/<PRESET> to results/reference/ (what the README quotes)
	@test -f results/tables/$*/$(PRESET)/table.md || \
		{ echo "error: results/tables/$*/$(PRESET)/table.md does not exist; run make reproduce-$* PRESET=$(PRESET) first" >&2; exit 2; }
	@mkdir -p results/reference/$*/$(PRESET)
	cp results/tables/$*/$(PRESET)/table.md results/tables/$*/$(PRESET)/table.csv \
		results/tables/$*/$(PRESET)/runs.csv results/reference/$*/$(PRESET)/
	-cp results/tables/$*/$(PRESET)/table.png results/reference/$*/$(PRESET)/
	@echo "promoted $* ($(PRESET)) to results/reference/$*/$(PRESET)/: review and commit it"

# --- text: GLUE finetuning of one checkpoint ------------------------------------------------
# Every GLUE task from an MLM checkpoint (an MLM run's <run>/hf folder or any of its .ckpt files),
# RTE/MRPC/STS-B from this sweep's MNLI runs (preset tiny: the five local tasks, from SST-2),
# then the GLUE table (conf/experiment/text/glue.yaml). Runs: $(GLUE_RUNS); table: $(GLUE_RUNS)/table.
CKPT      ?=
GLUE_RUNS ?= results/runs/finetune_glue/$(PRESET)/$(subst /,_,$(subst ./,,$(CKPT)))
.PHONY: finetune-glue

finetune-glue: install  ## GLUE from a checkpoint: make finetune-glue CKPT=<mlm run>/hf [PRESET=tiny]
	@test -n "$(CKPT)" || { echo "error: give CKPT=<an MLM run's hf/ folder or a .ckpt file>" >&2; exit 2; }
	@test -e "$(CKPT)" || { echo "error: CKPT=$(CKPT) does not exist" >&2; exit 2; }
	$(PY) scripts/reproduce.py glue --preset $(PRESET) --runs $(GLUE_RUNS) --out $(GLUE_RUNS)/table -- \
		pretrained=$(abspath $(CKPT)) $(TRAIN_ARGS)

# --- text: length generalisation (beyond the paper, issue 8 §8) ------------------------------
# Held-out masked-LM loss and accuracy of Table 1's pretrained models (BERT, Chimera-UG,
# Chimera-DAG: $(RUNS)/<model>/seed0/hf) at the training length x 1, 2, 4, 8, 16
# (scripts/length_generalisation.py; tasks/text/README.md). PRESET defaults to tiny here, not
# paper, unless given: the tiny runs are the ones a CPU makes. LENGTH_ARGS: more options
# (e.g. LENGTH_ARGS="--lengths 128,256 --tokens 32768").
LENGTH_PRESET = $(if $(filter command line environment override,$(origin PRESET)),$(PRESET),tiny)
RUNS        ?= results/runs/table1/$(LENGTH_PRESET)
LENGTH_ARGS ?=
.PHONY: length-generalisation

length-generalisation: install  ## MLM loss/accuracy vs evaluation length: make length-generalisation [RUNS=results/runs/table1/tiny] [PRESET=tiny]
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) scripts/length_generalisation.py --runs $(RUNS) \
		--preset $(LENGTH_PRESET) --out results/length_generalisation/$(LENGTH_PRESET) $(LENGTH_ARGS)
