# `make demo` and `make test` each set up what they need (scripts/setup.sh) on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
# Test processes: two fit the 2-core, 24 GB machine CI runs on (each starts its own Triton, Redis, ...).
TEST_WORKERS ?= 2

.PHONY: setup demo test lint format proto clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/looksync demo

test:
	@bash scripts/setup.sh --test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

proto: setup
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. gateway/api/looksync.proto

clean:
	rm -rf .looksync .pytest_cache
