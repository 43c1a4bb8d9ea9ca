# fastdiff: `make sample`, `make test`. `make venv` sets up .venv (never deletes it); `make build`
# recompiles fastdiff._C after a change in csrc/.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.fastdiff-deps
INSTALL_STAMP := $(VENV)/.fastdiff-install
PYTEST_ARGS ?= -n 2 --dist loadfile

# Compile the CUDA sources too (for sm_90: the GPU machines are H100/H200). setup.py finds the
# real toolkit root (CUDA_HOME) from nvcc itself.
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: venv build test sample

venv: $(INSTALL_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel

# torch 2.14.1 is the CUDA 13 build from the local mirror: it runs on the CPU and, unlike the CPU
# build, can compile CUDA extensions. pip skips whatever is already installed.
$(DEPS_STAMP): $(PY) Makefile
	$(PIP) install torch==2.14.1 torchvision==0.29.1 triton==3.8.0 "setuptools>=64" wheel ninja
	touch $@

# No build isolation: an isolated build would pull a second torch. ninja keeps objects in build/,
# so a re-install recompiles only what changed.
$(INSTALL_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(wildcard csrc/*)
	$(PIP) install -e ".[test,triton]" --no-build-isolation
	touch $@

build: venv
	$(PY) setup.py --quiet build_ext --inplace

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	echo "TRITON_INTERPRET=1 XDG_CACHE_HOME=$$tmp $(PY) -m pytest $(PYTEST_ARGS)" && \
	TRITON_INTERPRET=1 XDG_CACHE_HOME="$$tmp" $(PY) -m pytest $(PYTEST_ARGS)

sample: venv
	$(PY) -m fastdiff sample $(ARGS)
