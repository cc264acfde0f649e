# dycoke-eval. VENV can point at any virtual environment (CI keeps one outside the clone).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
LOCK := requirements.lock
# uv resolves the lock for every Python and platform it covers from one machine; it is a tool of
# `make lock` only (installed beside the environment), never of the installed harness.
UV := $(VENV)/bin/uv

TABLES := 1 2 3 4 5 6 7
REPRODUCE := $(addprefix reproduce-table,$(TABLES))

.PHONY: install lock smoke test test-slow nightly $(REPRODUCE)

install:  ## create $(VENV), install exactly the locked environment, then the project itself
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install --require-hashes --no-deps -r $(LOCK)
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e .

lock:  ## re-resolve $(LOCK) from pyproject.toml's ranges (Linux x86-64, CPython 3.11 and 3.12)
	test -x $(UV) || $(PYTHON) -m pip install -q uv
	$(UV) pip compile pyproject.toml --extra test --extra slurm --universal --python-version 3.11 \
		--generate-hashes --custom-compile-command "make lock" -o $(LOCK)

smoke:  ## the offline default: tiny model, fixture tasks, results under results/
	$(PYTHON) -m dycoke_eval

test:  ## the test suite (offline, CPU), under 5 minutes on 2 cores
	$(PYTHON) -m pytest -q -m "not slow"

test-slow:  ## the slow end-to-end runs kept out of `make test` (CI runs both)
	$(PYTHON) -m pytest -q -m slow

nightly:  ## the nightly regression: the 0.5B sweep, then a comparison with results/baselines/nightly.json
	$(PYTHON) -m dycoke_eval +sweep=nightly $(ARGS)
	$(PYTHON) -m dycoke_eval.nightly compare results --run-name nightly

$(REPRODUCE): reproduce-table%:  ## a paper table's sweep (GPUs and benchmark data; README "Reproducing the tables"); ARGS= narrows it
	$(PYTHON) -m dycoke_eval +sweep=table$* $(ARGS)
