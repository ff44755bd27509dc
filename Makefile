# `make demo` runs the quickstart; `make test` runs lint, types and the test suite. Each creates
# the virtual environment (.venv) from the project's own files first. The constraints file pins
# torch to the CPU wheel this machine (and CI) has on disk; pyproject.toml keeps an open range.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/student-client demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy protocol teacher_server student_client

test: lint
	$(BIN)/python -m pytest
