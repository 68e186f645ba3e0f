# bov: every target installs what it needs on first use (a local .venv).
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Where no CUDA driver is present, pin the CPU wheel so pip never pulls CUDA packages.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

PRESET  ?= tiny
VARIANT ?= bov

.PHONY: install test test-slow describe clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

## Fast test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q

## Slow cases only (marked @pytest.mark.slow).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

## Print the resolved per-layer value plan, parameters and FLOPs of a preset/variant.
describe: $(STAMP)
	$(VENV)/bin/bov describe --preset $(PRESET) --variant $(VARIANT)

clean:
	rm -rf $(VENV) .pytest_cache
