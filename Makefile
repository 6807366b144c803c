# Set-up and everyday targets. VENV can be overridden: make test VENV=/path/to/venv
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install install-compare test test-fast quickstart lint bench

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	$(PIP) install -q -e '.[dev]'

install-compare: install
	$(PIP) install -q -e '.[dev,compare]'

test: install
	$(PY) -m pytest -q -n 2

test-fast: install
	$(PY) -m pytest -q -n 2 -m 'not heavy'

quickstart: install
	$(VENV)/bin/lora-jax demo

lint: install
	$(VENV)/bin/ruff check lora_jax tests experiments

bench: install
	$(PY) experiments/benchmarks/train_step.py
