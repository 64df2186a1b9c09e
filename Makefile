# `make demo` and `make test` each set up what they need (scripts/setup.sh) on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint format proto clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/looksync demo

test:
	@bash scripts/setup.sh --test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

proto: setup
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. gateway/api/looksync.proto

clean:
	rm -rf .looksync .pytest_cache
