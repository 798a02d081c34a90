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

.PHONY: install run test verify ui bench bench-peers clean

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

# tests/test_browser.py opens the HTML feature browser in headless Chromium and skips without it.
test: install
	@command -v chromium >/dev/null || echo "note: no chromium: tests/test_browser.py will skip; install it with" \
	  "sudo apt-get install -y --no-install-recommends chromium (Debian; .ci/run does)"
	$(PY) -m pytest -q

# Reread every artifact of the suite against its checksums (add ARGS=--repair to take back damaged ones).
verify: install
	$(PY) -m pipelines.verify $(ARGS)

ui: install
	mkdir -p $(DAGSTER_HOME) && test -f $(DAGSTER_HOME)/dagster.yaml || printf 'telemetry:\n  enabled: false\npython_logs:\n  managed_python_loggers:\n    - spectra\n' > $(DAGSTER_HOME)/dagster.yaml
	$(PY) -m pipelines.stale_runs  # runs a killed process left STARTED are marked failed
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: install
	for script in benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script; done

# Peer SAE trainers live in their own venv so they can never change the project's pinned packages.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): pyproject.toml benchmarks/peers-requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 2>&1 | { grep -v "is ignored" || true; }
	$(PEERS_VENV)/bin/python -m pip install --quiet -e . -r benchmarks/peers-requirements.txt torch==2.14.1 torchvision==0.29.1 2>&1 | { grep -v "is ignored" || true; }
	$(PEERS_VENV)/bin/python -c "import torch, sparsify, sae_lens; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python benchmarks/bench_sae_peers.py $(BENCH_ARGS)

clean:
	rm -rf data
