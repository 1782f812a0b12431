# Fresh machine to results in one command each:
#   make test    create .venv, install torch + deps, build fastlm (every .cu file), run pytest
#   make bench   same setup, then run every benchmark (results under benchmarks/results/)
# Each target creates only what is missing (idempotent).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/*.h csrc/sm90/*.cu csrc/sm90/*.cuh) setup.py pyproject.toml

.PHONY: all deps build test bench gpu-check clean

all: test

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=64" wheel
	$(PIP) install -q torch numpy ninja pytest pytest-xdist transformers safetensors tokenizers tqdm
	# the GPU machine's triton, beside the local one, for tests/test_triton_compile.py's compile of
	# the kernels only that version takes (FASTLM_ATTENTION_WS); never imported by fastlm itself
	$(PIP) install -q --target $(VENV)/triton36 --no-deps triton==3.6.0
	touch $@

deps: $(VENV)/.deps

# Rebuild the extension only when a C++/CUDA source or the build script changed.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# One pytest worker per core when pytest-xdist is there (the interpreter-run kernels are CPU-bound).
test: build
	$(PY) -m pytest -q $$($(PY) -c "import xdist" 2>/dev/null && echo "-n auto") tests

bench: build
	$(PY) -m benchmarks.run_all --out benchmarks/results

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info fastlm/_C*.so $(VENV)/.built
