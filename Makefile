# Two commands: `make run` and `make test`. Everything else is a helper of those.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= conf/relay.yaml

.PHONY: run test lint check-config clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/relay serve --config $(CONFIG)

check-config: $(VENV)/.installed
	$(BIN)/relay check-config --config $(CONFIG)

lint: $(VENV)/.installed
	$(BIN)/ruff check relay tests
	$(BIN)/ruff format --check relay tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
