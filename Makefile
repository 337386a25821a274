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
