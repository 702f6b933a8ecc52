# kuda: `make demo` runs the main job on the embedded model, `make test` runs the test suite.
# Both install what they need first (a virtual environment in .venv).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: on the build machines pip takes the CPU wheel lying on disk (seconds).
# GPU machines: make install TORCH='torch>=2.2' (or any CUDA build you already use).
TORCH ?= torch==2.13.0
# This machine's pip configuration warns about every local index it cannot use: hide that noise.
QUIET := 2> >(grep -v '^WARNING: Location' >&2)

.PHONY: install test demo lint clean-outputs

install: $(VENV)/.installed

# uv resolves and installs the rest about 2.5x faster than pip (67 s vs 163 s here); it keeps
# the torch already installed, which satisfies the project's range. pip is the fallback.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)" uv $(QUIET)
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]' \
	  || $(BIN)/pip install -q --disable-pip-version-check -e '.[dev]' $(QUIET)
	touch $@

test: install
	$(BIN)/pytest -q

demo: install
	$(BIN)/kuda unlearn name=demo locate.samples=3

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean-outputs:
	rm -rf outputs
