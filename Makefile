# Set-up and everyday commands; `make run` and `make test` install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test lint bench bench-short

install:
	@scripts/install

run: install
	$(PY) -m server $(ARGS)

lint: install
	$(VENV)/bin/ruff check server adapters tests bench deploy
	$(VENV)/bin/ruff format --check server adapters tests bench deploy
	$(VENV)/bin/mypy

test: install lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Side by side with `vllm serve` and the engine alone (see BENCHMARKS.md); ~20 minutes.
bench: install
	$(PY) -m bench.compare $(ARGS)

# Seconds-to-minutes run that checks the harness end to end (CI).
bench-short: install
	$(PY) -m bench.compare --short
