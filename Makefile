# Quick start on a fresh Debian 12 machine, as root: `make run`, `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint bench clean

setup:
	@scripts/setup.sh

run: setup
	@scripts/run.sh

test: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
