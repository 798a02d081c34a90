# The two set-up commands of the README: `make run` and `make test`. Both create .venv if missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export SPECTRA_ROOT ?= $(CURDIR)/data
export DAGSTER_HOME ?= $(SPECTRA_ROOT)/dagster_home
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: install run test ui bench clean

install: $(STAMP)

# Reinstall when the dependency list changes; torch/torchvision are pinned in pyproject.toml.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# (the grep hides this machine's pip warnings about absent local mirrors; pip's status still counts)
	$(PY) -m pip install --quiet -e '.[dev]' 2>&1 | { grep -v "is ignored" || true; }
	$(PY) -c "import torch, torchvision, dagster, zarr, duckdb, timm, open_clip"
	touch $(STAMP)

run: install
	$(PY) -m pipelines.run

test: install
	$(PY) -m pytest -q

ui: install
	mkdir -p $(DAGSTER_HOME) && test -f $(DAGSTER_HOME)/dagster.yaml || printf 'telemetry:\n  enabled: false\n' > $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: install
	for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script; done

clean:
	rm -rf data
