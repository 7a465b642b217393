# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned here (a CPU wheel is available locally); the library itself asks only torch>=2.6.
TORCH_PIN ?= torch==2.13.0
# llama-cpp-python (the llama.cpp client the GGUF tests run) compiles llama.cpp on its first install
# (~5 min on 2 cores; pip caches the wheel for later installs): only the library, not the multimodal part, and
# without llama.cpp's AMX kernels, which a native build takes on CPUs with AMX and which crash its q8_0 products there
# (ggml-org/llama.cpp#20824: a segfault in ggml_backend_amx_mul_mat; AVX-512 serves them instead)
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
	-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install client demo test lint bench clean
LINT_PATHS ?= src/moelab

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_PIN)"
	touch $@

# the llama.cpp client the GGUF tests run: compiled on the first install, then served by pip's wheel cache
client: $(VENV)/.client

$(VENV)/.client: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(BUILD_JOBS) \
		$(PY) -m pip install -q -e ".[client]" "$(TORCH_PIN)"
	touch $@

demo: install
	$(PY) -m moelab demo

test: install client
	$(PY) -m pytest -n 2 --dist loadfile --durations=10

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
