# Developer entry points. `make install` is idempotent: it only re-runs pip when the
# packaging files or native sources change (tracked by .install-stamp).
SHELL := /bin/bash
.DEFAULT_GOAL := install

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# CPU wheel index, added unless torch==2.13.0 is already installed or pip's configured
# sources (e.g. find-links) already offer the +cpu build, so the pinned torch never resolves
# to the (huge) CUDA build from PyPI.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
BUILD_DEPS := "setuptools>=69" wheel "pybind11>=2.12" "cmake>=3.24" ninja
NATIVE_SRCS := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.inc' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null)

.PHONY: install run test bench build-ext clean-ext

$(VPY):
	$(PYTHON) -m venv $(VENV)

.install-stamp: $(VPY) pyproject.toml setup.py CMakeLists.txt $(NATIVE_SRCS)
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install $(BUILD_DEPS)
	@extra=""; \
	if $(VPY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then :; \
	elif $(VPY) -m pip install --dry-run --no-deps --ignore-installed "torch==2.13.0" 2>/dev/null \
	    | grep -q "Would install torch-2.13.0+cpu"; then :; \
	elif [ -n "$(TORCH_INDEX_URL)" ]; then extra="--extra-index-url $(TORCH_INDEX_URL)"; fi; \
	echo "$(VPY) -m pip install --no-build-isolation $$extra -e .[test]"; \
	$(VPY) -m pip install --no-build-isolation $$extra -e ".[test]"
	$(VPY) -c "from fmrt import _C; print('fmrt._C', _C.__version__, _C.build_info())"
	touch $@

install: .install-stamp

run: install
	$(VENV)/bin/fmrt serve --host 127.0.0.1 --port 8000 --backend onnxruntime

test: install
	$(VPY) -m pytest -q tests

bench: install
	$(VPY) -m pytest benchmarks --benchmark-only

# Rebuild fmrt/_C*.so in place (incremental: the CMake tree lives under build/).
build-ext: $(VPY)
	$(VPY) setup.py build_ext --inplace

clean-ext:
	rm -rf build/cmake-* fmrt/_C*.so .install-stamp
