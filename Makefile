# dycoke-eval. VENV can point at any virtual environment (CI keeps one outside the clone).
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: install smoke test

install:  ## create $(VENV) and install the package with its test extra
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -e ".[test]"

smoke:  ## the offline default: tiny model, fixture tasks, results under results/
	$(PYTHON) -m dycoke_eval

test:  ## the test suite (offline, CPU)
	$(PYTHON) -m pytest -q
