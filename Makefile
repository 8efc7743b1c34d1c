# The two entry points of the README. Each sets up .venv itself (CPU torch pin,
# the package with its test extra) and then runs its job.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup demo test test-all clean

$(BIN)/fusioner: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

setup: $(BIN)/fusioner

demo: setup
	$(BIN)/fusioner demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) demo-out
