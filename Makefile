# make train: set up .venv (if needed) and run the main training job on embedded defaults.
# make test:  set up .venv (if needed) and run every test, unit and integration.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dfmvr-installed

.PHONY: setup test train unit clean

# idle OpenMP threads sleep instead of spinning (tests and training share 2 cores with workers)
export OMP_WAIT_POLICY ?= PASSIVE
export RAY_USAGE_STATS_ENABLED ?= 0
export MPLBACKEND ?= Agg

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,pytorch3d,detect]"
	touch $(STAMP)

setup: $(STAMP)

# pytest's exit status passes through: an empty selection (exit 5) fails too.
test: setup
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest tests/unit

train: setup
	$(PY) jobs/train.py

clean:
	rm -rf $(VENV) work .pytest_cache
