# `make demo` and `make test` set up everything they need: .venv with the pinned torch, the package, the build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
EDITABLE_STAMP := $(VENV)/.editable-installed
PIP_DEPS := setuptools>=64 wheel torch==2.14.1 numpy pytest expecttest ninja transformers==5.23.0 scikit-image pillow matplotlib pytest-benchmark tqdm

.PHONY: build test test-fast demo bench bench-smoke clean

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

demo: build
	$(VENV)/bin/hiprune demo

# The benchmark suite (results under benchmarks/results/<device>/); BENCH_ARGS= for the full sweeps.
BENCH_ARGS ?= --quick
bench: build
	$(PY) -m benchmarks $(BENCH_ARGS)

# Every benchmark case once at tiny shapes, its candidates checked against each other (CI).
bench-smoke: build
	$(PY) -m pytest -q benchmarks --benchmark-disable -p no:cacheprovider

clean:
	rm -rf build hiprune_ops/*.so *.egg-info
