# Set-up and everyday commands; `make run` and `make test` install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test lint unit

install:
	@scripts/install

run: install
	$(PY) -m server $(ARGS)

lint: install
	$(VENV)/bin/ruff check server adapters tests
	$(VENV)/bin/ruff format --check server adapters tests
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)
