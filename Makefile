# The two README commands: `make demo` and `make test`. Both run setup first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test lint unit integration proto down clean

setup:
	@scripts/setup.sh

demo: setup
	$(PY) -m ambimesh lab up
	$(PY) -m ambimesh lab demo

down: setup
	$(PY) -m ambimesh lab down

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

unit: setup
	.venv/bin/pytest -q tests/unit

test: lint
	.venv/bin/pytest -q tests

proto: setup
	scripts/gen_proto.sh
