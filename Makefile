# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# The demo needs the package alone; the tests, lint and benchmarks need the test extra.
# Another Python, in a venv of its own: `make test PYTHON=python3.13 VENV=.venv313` (a
# variable given on the command line overrides the one here; one in the environment does not).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test bench lint clean install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/safepoint demo

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: $(TEST_STAMP)
	$(BIN)/pip install -q -r bench/requirements.txt
	$(BIN)/python -m bench

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .venv313 .safepoint build dist src/*.egg-info
