# Two commands: `make run` (the relay on conf/relay.yaml) and `make test` (lint, types, the whole
# suite). Both create .venv and install what they need first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= conf/relay.yaml

.PHONY: run test lint check-config system-venv clean

$(BIN)/python:
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory system-venv
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Debian ships venv's ensurepip in a separate package.
system-venv:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; \
	else \
		echo "relay: Python's venv module is missing: apt-get install python3-venv" >&2; exit 1; \
	fi

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/relay serve --config $(CONFIG)

check-config: $(VENV)/.installed
	$(BIN)/relay check-config --config $(CONFIG)

lint: $(VENV)/.installed
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
