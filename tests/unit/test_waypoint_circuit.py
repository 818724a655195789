"""Circuit breakers (waypoint/circuit.py), rate limit (waypoint/ratelimit.py), fault
injection (waypoint/fault.py) and response flags (waypoint/flags.py): the small guards a
request meets before it reaches an endpoint, with fake clocks and seeded RNGs."""

from __future__ import annotations

import random

import pytest

from mesh.api import mesh_pb2
from waypoint.circuit import UNLIMITED, CircuitBreaker, Overflow
from waypoint.fault import NO_FAULT, FaultDecision, decide
from waypoint.flags import ResponseFlag, join
from waypoint.ratelimit import TokenBucket
from waypoint.retry import RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_unset_limits_are_istio_unlimited() -> None:
    breaker = CircuitBreaker(mesh_pb2.ConnectionPool())
    assert breaker.requests.max == breaker.pending.max == UNLIMITED
    assert breaker.retries.max == breaker.connections.max == UNLIMITED
    assert CircuitBreaker().requests.max == UNLIMITED


def test_max_requests_overflows_with_uo_and_recovers_on_exit() -> None:
    breaker = CircuitBreaker(mesh_pb2.ConnectionPool(max_requests=2))
    breaker.enter_request()
    breaker.enter_request()
    with pytest.raises(Overflow) as raised:
        breaker.enter_request()
    assert raised.value.flag is ResponseFlag.UPSTREAM_OVERFLOW
    assert join([raised.value.flag]) == "UO"
    assert raised.value.limit == "max_requests"
    breaker.exit_request()
    breaker.enter_request()


def test_max_pending_requests() -> None:
    breaker = CircuitBreaker(mesh_pb2.ConnectionPool(max_pending_requests=1))
    breaker.enter_pending()
    with pytest.raises(Overflow, match="max_pending_requests"):
        breaker.enter_pending()
    breaker.exit_pending()
    breaker.exit_pending()  # unmatched exits never go negative
    assert breaker.pending.count == 0


def test_max_connections_and_max_retries() -> None:
    breaker = CircuitBreaker(mesh_pb2.ConnectionPool(max_connections=1, max_retries=2))
    assert breaker.try_connection()
    assert not breaker.try_connection()
    breaker.exit_connection()
    assert breaker.try_connection()
    assert [breaker.try_retry() for _ in range(3)] == [True, True, False]
    breaker.exit_retry()
    assert breaker.try_retry()


def test_retry_budget_replaces_max_retries_and_counts_active_and_pending() -> None:
    breaker = CircuitBreaker(mesh_pb2.ConnectionPool(max_retries=1), RetryBudget(50.0, 1))
    for _ in range(6):
        breaker.enter_request()
    for _ in range(4):
        breaker.enter_pending()
    assert [breaker.try_retry() for _ in range(6)] == [True] * 5 + [False]
    breaker.exit_retry()
    assert breaker.try_retry()


def test_token_bucket_burst_then_continuous_refill() -> None:
    clock = Clock()
    bucket = TokenBucket(requests=8, per_seconds=1.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 1 / 16  # half a token
    assert not bucket.take()
    clock.now += 1 / 16
    assert bucket.take()
    assert not bucket.take()
    clock.now += 100  # refill never exceeds the burst
    assert sum(bucket.take() for _ in range(10)) == 3


@pytest.mark.parametrize(
    ("requests", "per_seconds", "burst", "seconds", "allowed"),
    [
        (64, 32.0, 0, 32, 128),  # burst 0: one period's worth up front, then the rate
        (5, 1.0, 2, 2, 12),
        (1, 0.0, 0, 3, 4),  # per_seconds 0: one second
    ],
)
def test_token_bucket_rate_over_time(
    requests: int, per_seconds: float, burst: int, seconds: int, allowed: int
) -> None:
    """A client asking 50 times every 1/64 s (binary-exact steps) gets the burst, then
    exactly the rate."""
    clock = Clock()
    limit = mesh_pb2.RateLimit(requests=requests, per_seconds=per_seconds, burst=burst)
    bucket = TokenBucket.from_proto(limit, clock)
    granted = 0
    for _ in range(seconds * 64 + 1):
        granted += sum(bucket.take() for _ in range(50))
        clock.now += 1 / 64
    assert granted == allowed


def test_no_fault() -> None:
    assert decide(None, random.Random(0)) is NO_FAULT
    assert decide(mesh_pb2.HttpFault(), random.Random(0)) == NO_FAULT
    assert NO_FAULT.flags == ()


@pytest.mark.parametrize(
    ("fault", "delayed", "aborted"),
    [
        (mesh_pb2.HttpFault(delay_seconds=2, delay_percent=10), 0.10, 0.0),
        (mesh_pb2.HttpFault(delay_seconds=2), 1.0, 0.0),  # delay without percent: all
        (mesh_pb2.HttpFault(abort_status=503, abort_percent=25), 0.0, 0.25),
        (mesh_pb2.HttpFault(abort_status=503), 0.0, 0.0),  # abort without percent: none
        (mesh_pb2.HttpFault(abort_status=500, abort_percent=100), 0.0, 1.0),
        (mesh_pb2.HttpFault(abort_status=500, abort_percent=0.1), 0.0, 0.001),
        (
            mesh_pb2.HttpFault(
                delay_seconds=1, delay_percent=50, abort_status=418, abort_percent=50
            ),
            0.5,
            0.5,
        ),
    ],
)
def test_fault_percentages_over_many_draws(
    fault: mesh_pb2.HttpFault, delayed: float, aborted: float
) -> None:
    rng = random.Random(42)
    n = 20_000
    decisions = [decide(fault, rng) for _ in range(n)]
    delays = sum(d.delay_seconds > 0 for d in decisions) / n
    aborts = sum(d.abort_status is not None for d in decisions) / n
    tolerance = 0.015
    assert abs(delays - delayed) <= tolerance
    assert abs(aborts - aborted) <= tolerance
    assert {d.delay_seconds for d in decisions} <= {0.0, fault.delay_seconds}
    assert {d.abort_status for d in decisions} <= {None, fault.abort_status}


def test_fault_decision_flags() -> None:
    both = FaultDecision(delay_seconds=1.5, abort_status=503)
    assert both.flags == (ResponseFlag.DELAY_INJECTED, ResponseFlag.FAULT_INJECTED)
    assert join(both.flags) == "DI,FI"


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        ([], "-"),
        ([ResponseFlag.UPSTREAM_OVERFLOW], "UO"),
        (
            [ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED, ResponseFlag.UPSTREAM_CONNECTION_FAILURE],
            "UF,URX",
        ),
        ([ResponseFlag.RATE_LIMITED, ResponseFlag.RATE_LIMITED], "RL"),
        (
            [ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION, ResponseFlag.NO_HEALTHY_UPSTREAM],
            "UH,DC",
        ),
    ],
)
def test_flags_join_in_envoy_order(flags: list[ResponseFlag], text: str) -> None:
    assert join(flags) == text
