# `make test` and `make run` work on a fresh clone: they create .venv and install what they need.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST_ARGS ?= -m "not slow and not gpu" -q

.PHONY: install install-extras lint test test-slow test-gpu run bench clean

$(BIN)/lsp:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .[dev,accelerate]   # accelerate: tests/train/test_accelerate.py launches through it

install: $(BIN)/lsp

EXTRAS ?= dev,hf,deepspeed,datasets,tokenizers,eval
install-extras: install   # the optional extras, so that their tests run instead of skipping (CI does this)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"

$(BIN)/ruff: | $(BIN)/lsp
	$(BIN)/pip install -q "ruff>=0.6"

lint: $(BIN)/ruff
	$(BIN)/ruff check lsp tests benchmarks examples

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow -q

test-gpu: install
	$(BIN)/python -m pytest -m gpu -q

run: install
	$(BIN)/lsp launch --nproc-per-node 2 configs/tiny-cpu.yaml

bench: install
	$(BIN)/python benchmarks/ops.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
