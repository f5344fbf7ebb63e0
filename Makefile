# `make train` runs the trainer, `make test` the tests; both create .venv and
# build the extension first.  `make build` rebuilds the extension after csrc/ changes.

PYTHON := .venv/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export MAX_JOBS ?= 2

# Compile the CUDA kernels whenever nvcc is here, forced on so that a .cu that
# does not compile fails the build (and CI) instead of being skipped.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
export DENSENET_FAST_CUDA ?= 1
endif

.PHONY: venv build test train

venv: .venv/installed

.venv/installed: pyproject.toml setup.py
	test -x $(PYTHON) || python3 -m venv .venv
	$(PYTHON) -m pip install "setuptools>=64" wheel ninja
	$(PYTHON) -m pip install $(TORCH_PINS)
	$(PYTHON) -m pip install --no-build-isolation -e '.[test]'
	touch $@

build: venv
	$(PYTHON) setup.py --quiet build_ext --inplace

test: build
	$(PYTHON) -m pytest -q tests

train: build
	$(PYTHON) -m densenet_fast train $(ARGS)
