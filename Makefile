# Quick start: `make demo` (install + the main job) and `make test` (install + the test suite).
# Both create ./.venv with the Python found as $(PYTHON) (3.11+). On a machine without an NVIDIA GPU, torch's CPU
# build is installed for the tests (the demo does not need torch).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-fast venv clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.train: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[train]"
	touch $@

$(VENV)/.test: $(VENV)/.train
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "+ pip install $(TORCH) from $(TORCH_CPU_INDEX) (no GPU: the CPU build)"; \
	  $(BIN)/python -m pip install --quiet --retries 0 --timeout 20 --no-deps --index-url "$(TORCH_CPU_INDEX)" \
	    "$(TORCH)" || echo "(the CPU index is out of reach: the default build)"; \
	fi
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python scripts/install_libtpu.py || echo "(libtpu could not be installed: the TPU compile test will skip)"
	touch $@

venv: $(VENV)/.test

demo: $(VENV)/.train
	$(BIN)/python scripts/demo.py $(ARGS)

test: $(VENV)/.test
	. $(BIN)/activate && eval "$$(awk '/<!-- test-command/{f=1; next} f && /^```bash/{i=1; next} i && /^```/{exit} i{print}' README.md)"

test-fast: $(VENV)/.test   # the edit loop: every test not marked slow (the end-to-end runs and oracles are)
	. $(BIN)/activate && python -m pytest -n 2 -q -m "not slow"

clean-demo:
	rm -rf out/demo
