# Two commands: `make run` (the relay on conf/relay.yaml) and `make test` (lint, types, the whole
# suite). Both create .venv and install what they need first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= conf/relay.yaml

.PHONY: run test lint check-config system-venv bench bench-postfix-tuning bench-versions bench-api bench-scale bench-memory bench-tools clean

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

# Side by side with Postfix (its smtp-source, smtp-sink and private Postfix instances): the relay,
# Postfix tuned as a pure relay and the bench's earlier Postfix, alternating in rounds, more
# rounds where a case's ratios spread wide; a Markdown table and raw JSON in bench/results/
# (15-25 minutes). BENCH_ARGS="--runs 1" for a quick look.
bench: $(VENV)/.installed bench-tools
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

# Postfix alone: the tuned configuration without each of its settings, alternating in rounds
# (bench/results/postfix-tuning.json; about 20 minutes). TUNING_ARGS="--runs 1" for a quick look.
bench-postfix-tuning: $(VENV)/.installed bench-tools
	$(BIN)/python bench/postfix_tuning.py $(TUNING_ARGS)

# The relay against an earlier revision of itself (BASE, default main), alternating pairs at
# 1 and 20 sessions, 1 KiB and 100 KiB (bench/results/versions-<base>.json; about 10 minutes).
BASE ?= main
bench-versions: $(VENV)/.installed bench-tools
	$(BIN)/python bench/versions.py --base $(BASE) $(VERSIONS_ARGS)

# POST /v1/messages against SMTP on one daemon, alternating rounds at 1 and 8 clients
# (bench/results/api-submit.json; about 3 minutes). API_ARGS="--messages 200 --rounds 1" for a look.
bench-api: $(VENV)/.installed
	$(BIN)/python bench/api_submit.py $(API_ARGS)

# 1,000,000 deferred messages in a spool, then the relay started on it: first delivery, the
# scheduler's RSS, `relay queue summary` (bench/results/scale.json; about 20 minutes, most of
# it writing and removing two million files). SCALE_ARGS="--messages 100000" for a quick look.
bench-scale: $(VENV)/.installed bench-tools
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

# The intake's memory with 30 and 300 sessions in DATA at once, 5 MB and 25 MB messages, every
# one checked at a sink (bench/results/data-memory-latest.json and .md; 7.5 GB through the
# spool in the largest case). MEMORY_ARGS="--sessions 30 --sizes 5M" for a quick look.
bench-memory: $(VENV)/.installed
	$(BIN)/python bench/data_memory.py $(MEMORY_ARGS)

# Debian's postfix, installed without configuring the system's own mail service.
bench-tools:
	@command -v smtp-source >/dev/null && command -v smtp-sink >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix; \
		else \
			echo "relay: make bench needs Debian's postfix: sudo apt-get install postfix" >&2; exit 1; \
		fi; }

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
