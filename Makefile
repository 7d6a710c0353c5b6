# cellseg-batch: `make demo` sets everything up and runs the demo; `make test` sets up and runs the tests.
# Set PYTHON to choose the interpreter, TORCH to choose the torch build (e.g. a CUDA wheel index's).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.cellseg-setup

.PHONY: setup demo test test-slow bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml cellseg_batch/setup_detectron2.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/python -m cellseg_batch.setup_detectron2
	$(BIN)/cellseg-batch doctor
	touch $@

demo: setup
	$(BIN)/cellseg-batch demo demo/

test: setup
	$(BIN)/python -m pytest -q tests

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

bench: setup
	test -f demo/model/cellseg.json || $(BIN)/cellseg-batch demo demo/
	$(BIN)/python benchmarks/bench_detectron2.py --model demo/model
	$(BIN)/python benchmarks/bench_labels.py
	$(BIN)/python benchmarks/bench_driver.py
	$(BIN)/python benchmarks/plot.py

lint: setup
	$(BIN)/ruff check cellseg_batch tests benchmarks

clean:
	rm -rf demo/ .pytest_cache
