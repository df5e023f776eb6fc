# One venv for everything. `make demo` and `make test` set up a fresh machine on their own.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokensparse-installed

.PHONY: setup demo test test-all bench lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,diffusers,train]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tokensparse demo

test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
