# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned here (a CPU wheel is available locally); the library itself asks only torch>=2.6.
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test lint bench clean
LINT_PATHS ?= src/moelab

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $@

demo: install
	$(PY) -m moelab demo

test: install
	$(PY) -m pytest -n 2 --dist loadfile

# ruff (lint + format) and mypy, configured in pyproject.toml
lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy $(LINT_PATHS)
	$(PY) tests/layers.py src/moelab

bench: install
	$(PY) benchmarks/moe_layer.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
