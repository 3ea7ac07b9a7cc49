# One entry point: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench fuzz check-deep setup clean

FUZZ_SECONDS ?= 600

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Start a three-node cluster on loopback and run the four-phase scenario.
demo: $(STAMP)
	$(BIN)/presence demo

## Lint, type-check, check the import boundaries, then run the whole test suite.
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check impl model tests benchmarks
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest --hypothesis-profile=ci

## Fuzz the core against the model for FUZZ_SECONDS (a scheduled job; saves regressions).
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz --seconds $(FUZZ_SECONDS)

## Explore every model history one event beyond the CI bounds (2 nodes/7 events, 3 nodes/5).
check-deep: $(STAMP)
	$(BIN)/python -m presence_model.explore --deep

## Print core throughput and memory figures beside the Phoenix reference.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
