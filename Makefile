# muscle — developer entry points.
#   make test   create .venv from this repository's files and run the whole suite (CI runs this)
#   make demo   the whole pipeline on the embedded model pair (see README)
#   make lint   ruff
PY      ?= python3
VENV    ?= .venv
PIP     := $(VENV)/bin/pip
PYTHON  := $(VENV)/bin/python
# torch is pinned to the CPU build first: an unpinned torch pulls a multi-GB CUDA wheel.
TORCH   ?= torch==2.13.0
EXTRAS  ?= dev,gguf,evalharness
DEEPSPEED ?= deepspeed==0.19.8
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)

.PHONY: env test test-fast lint demo bench clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	# DeepSpeed is an sdist whose setup.py imports torch: build it against the torch above
	# (with build isolation pip would fetch a second, CUDA torch just to build it).
	$(PIP) install --quiet "setuptools>=70.1"
	$(PIP) install --quiet --no-build-isolation "$(DEEPSPEED)"
	rm -f $(VENV)/.installed-*
	touch $@

lint: env
	$(VENV)/bin/ruff check muscle kernels bin benchmarks tests
	$(VENV)/bin/ruff format --check --extend-exclude "*.md" muscle kernels bin benchmarks tests

test: env lint
	$(VENV)/bin/pytest -q tests

test-fast: env
	$(VENV)/bin/pytest -q -m "not slow" tests

demo: env
	$(VENV)/bin/muscle-demo --out runs/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
