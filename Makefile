# Two front-door commands: `make serve` and `make test` (both set up .venv on first use).
# While developing: `make test-fast` (lint, then the tests not marked slow) and `make hooks` once.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup serve test test-fast lint hooks bench reliability

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: on these machines 2.13.0 is a local CPU build; anything else pulls CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[export,test,bench,openvino,clients,deploy,compat-test,ray,colbert-test]'
	$(PY) -m pip install -q --no-deps infinity-client langchain-cohere  # clients: they pin httpx<0.28, cohere<6; work with both
	# PyLate (tests/test_colbert.py's reference) pins sentence-transformers 5.3 and, through fast-plaid, another
	# torch: installed without its dependencies, with sentence-transformers 5.3 in a side folder it alone uses.
	$(PY) -m pip install -q --no-deps pylate==1.6.0
	$(PY) -m pip install -q --no-deps --target $(VENV)/pylate-st5 sentence-transformers==5.3.0
	touch $(STAMP)

serve: setup
	$(VENV)/bin/encapure serve $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Everything but the tests marked slow (> ~30 s each: full-dataset quality runs, real exports).
test-fast: lint
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# The git pre-commit hook of .pre-commit-config.yaml (ruff check and mypy, from .venv).
hooks: setup
	$(PY) -m pip install -q pre-commit
	$(VENV)/bin/pre-commit install

bench: setup
	$(PY) -m benchmarks $(ARGS)

# Overload and abuse against real servers on 127.0.0.1 (bounded; ~2-3 minutes): prints a table.
reliability: setup
	$(PY) scripts/reliability.py $(ARGS)
