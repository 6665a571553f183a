# README's two commands: `make demo` and `make test`. Everything installs from requirements.txt.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip prints a warning per package for this machine's extra local indexes; keep the log readable.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

ARGN_VENV := .venv-argn
ARGN_STAMP := $(ARGN_VENV)/.installed

.PHONY: install argn-venv demo test test-fast bench bench-smoke lint clean compile-requirements

# setup.py builds the one C module (include/synthfactory/ingest/_flatc.c) in place with `pip install -e .`
$(STAMP): requirements.txt pyproject.toml setup.py include/synthfactory/ingest/_flatc.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import synthfactory, airflow.sdk, sdv, great_expectations, torch; assert torch.__version__.startswith('2.13.0')"
	touch $(STAMP)

install: $(STAMP)

# The tabular_argn engine's own interpreter: mostlyai-engine cannot share .venv with Airflow 3.3 (psutil pins).
$(ARGN_STAMP): requirements-argn.txt
	test -x $(ARGN_VENV)/bin/python || $(PYTHON) -m venv $(ARGN_VENV)
	$(ARGN_VENV)/bin/python -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(ARGN_VENV)/bin/python -m pip install -q --no-deps -r requirements-argn.txt 2>&1 | $(QUIET_PIP)
	$(ARGN_VENV)/bin/python -c "import mostlyai.engine, torch; assert torch.__version__.startswith('2.13.0')"
	touch $(ARGN_STAMP)

argn-venv: $(ARGN_STAMP)

demo: install
	$(BIN)/python scripts/demo.py

test: install argn-venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

# Benchmarks (bench/README.md): every figure next to its anchor, measured in one run.
bench: install
	$(BIN)/python bench/run.py

bench-smoke: install
	$(BIN)/python bench/run.py --smoke

# Re-pin requirements.txt from requirements.in (needs uv; torch stays the local CPU build 2.13.0).
compile-requirements:
	$(BIN)/python -m pip install -q uv
	echo "torch==2.13.0+cpu" > /tmp/sf-torch-override.txt
	$(BIN)/uv pip compile requirements.in --python-version 3.11 --find-links /opt/wheels \
	  --override /tmp/sf-torch-override.txt --no-header -o requirements.txt
	sed -i 's/^torch==2.13.0+cpu/torch==2.13.0/' requirements.txt
	! grep -nE '^(nvidia-|triton|cuda-)' requirements.txt  # a CUDA wheel in the lock would pull GBs

clean:
	rm -rf .airflow .staging .demo released data/sample_extract
