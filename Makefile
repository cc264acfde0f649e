# dycoke-eval. VENV can point at any virtual environment (CI keeps one outside the clone).
VENV ?= .venv
PYTHON := $(VENV)/bin/python

TABLES := 1 2 3 4 5 6 7
REPRODUCE := $(addprefix reproduce-table,$(TABLES))

.PHONY: install smoke test nightly $(REPRODUCE)

install:  ## create $(VENV) and install the package with its test extra
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -e ".[test]"

smoke:  ## the offline default: tiny model, fixture tasks, results under results/
	$(PYTHON) -m dycoke_eval

test:  ## the test suite (offline, CPU)
	$(PYTHON) -m pytest -q

nightly:  ## the nightly regression: the 0.5B sweep, then a comparison with results/baselines/nightly.json
	$(PYTHON) -m dycoke_eval +sweep=nightly $(ARGS)
	$(PYTHON) -m dycoke_eval.nightly compare results --run-name nightly

$(REPRODUCE): reproduce-table%:  ## a paper table's sweep (GPUs and benchmark data; README "Reproducing the tables"); ARGS= narrows it
	$(PYTHON) -m dycoke_eval +sweep=table$* $(ARGS)
