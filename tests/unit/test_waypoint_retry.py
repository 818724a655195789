"""Retry decisions, back-off and the retry budget (waypoint/retry.py), table-driven against
Envoy's retry_on semantics and Istio's defaults."""

from __future__ import annotations

import random

import pytest

from mesh.api import mesh_pb2
from waypoint.retry import (
    CONNECT_FAILURE,
    OVERFLOW,
    REFUSED_STREAM,
    RESET,
    TIMEOUT,
    RetryBudget,
    RetryPolicy,
)


def policy(*retry_on: str, codes: tuple[int, ...] = ()) -> RetryPolicy:
    return RetryPolicy.from_proto(
        mesh_pb2.HttpRetry(attempts=3, retry_on=retry_on, retriable_status_codes=codes)
    )


def test_istio_default_when_the_route_says_nothing() -> None:
    default = RetryPolicy.from_proto(None)
    assert default.attempts == 2
    assert default.retry_on == {
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
        "retriable-status-codes",
    }
    assert not default.retriable_status_codes  # Istio >= 1.24: 503 is not retried
    assert default.backoff_base_seconds == 0.025
    assert default.backoff_max_seconds == 0.25


def test_attempts_zero_disables_and_empty_retry_on_keeps_istio_default() -> None:
    assert RetryPolicy.from_proto(mesh_pb2.HttpRetry(attempts=0)).attempts == 0
    only_attempts = RetryPolicy.from_proto(mesh_pb2.HttpRetry(attempts=5))
    assert only_attempts.attempts == 5
    assert only_attempts.retry_on == RetryPolicy().retry_on


def test_numbers_in_retry_on_are_status_codes() -> None:
    p = policy("5xx", " 409 ", "gateway-error", codes=(418,))
    assert p.retry_on == {"5xx", "gateway-error", "retriable-status-codes"}
    assert p.retriable_status_codes == {409, 418}


def test_backoff_settings_from_proto() -> None:
    p = RetryPolicy.from_proto(
        mesh_pb2.HttpRetry(attempts=1, backoff_base_seconds=0.1, per_try_timeout_seconds=2)
    )
    assert (p.backoff_base_seconds, p.backoff_max_seconds, p.per_try_timeout_seconds) == (
        0.1,
        1.0,
        2.0,
    )
    odd = RetryPolicy.from_proto(
        mesh_pb2.HttpRetry(attempts=1, backoff_base_seconds=0.5, backoff_max_seconds=0.2)
    )
    assert odd.backoff_max_seconds == 0.5  # never below the base


@pytest.mark.parametrize(
    ("retry_on", "status", "error", "expected"),
    [
        (("5xx",), 500, None, True),
        (("5xx",), 503, None, True),
        (("5xx",), 499, None, False),
        (("5xx",), None, CONNECT_FAILURE, True),
        (("5xx",), None, RESET, True),
        (("5xx",), None, TIMEOUT, True),
        (("gateway-error",), 502, None, True),
        (("gateway-error",), 504, None, True),
        (("gateway-error",), 500, None, False),
        (("gateway-error",), None, REFUSED_STREAM, True),
        (("connect-failure",), None, CONNECT_FAILURE, True),
        (("connect-failure",), None, RESET, False),
        (("connect-failure",), 503, None, False),
        (("reset",), None, RESET, True),
        (("reset",), None, CONNECT_FAILURE, True),
        (("reset",), 503, None, False),
        (("refused-stream",), None, REFUSED_STREAM, True),
        (("refused-stream",), None, RESET, False),
        (("retriable-4xx",), 409, None, True),
        (("retriable-4xx",), 404, None, False),
        (("5xx", "reset", "gateway-error", "connect-failure"), None, OVERFLOW, False),
        (("unknown-policy",), 503, None, False),
        (("5xx",), 200, None, False),
        (("5xx",), None, None, False),
    ],
)
def test_retry_on(
    retry_on: tuple[str, ...], status: int | None, error: str | None, expected: bool
) -> None:
    assert policy(*retry_on).should_retry(status, error) is expected


def test_retriable_status_codes() -> None:
    p = policy("retriable-status-codes", codes=(503, 429))
    assert p.should_retry(429, None)
    assert p.should_retry(503, None)
    assert not p.should_retry(500, None)
    assert not policy("retriable-status-codes").should_retry(503, None)


def test_istio_default_retries_connect_failures_and_grpc_unavailable_only() -> None:
    default = RetryPolicy()
    assert default.should_retry(None, CONNECT_FAILURE)
    assert default.should_retry(None, REFUSED_STREAM)
    assert not default.should_retry(None, RESET)
    assert not default.should_retry(503, None)
    assert default.should_retry(200, None, grpc_status=14)  # unavailable
    assert default.should_retry(200, None, grpc_status=1)  # cancelled
    assert not default.should_retry(200, None, grpc_status=13)  # internal


@pytest.mark.parametrize(
    ("name", "grpc_status"),
    [
        ("cancelled", 1),
        ("deadline-exceeded", 4),
        ("resource-exhausted", 8),
        ("internal", 13),
        ("unavailable", 14),
    ],
)
def test_grpc_retry_on(name: str, grpc_status: int) -> None:
    assert policy(name).should_retry(200, None, grpc_status=grpc_status)
    assert not policy(name).should_retry(200, None, grpc_status=0)
    assert not policy(name).should_retry(200, None)


def test_reset_before_request_only_when_nothing_was_sent() -> None:
    p = policy("reset-before-request")
    assert p.should_retry(None, RESET, request_sent=False)
    assert not p.should_retry(None, RESET, request_sent=True)


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(0, 0.025), (1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (9, 0.25), (10_000, 0.25)],
)
def test_backoff_is_full_jitter_below_the_doubling_ceiling(attempt: int, ceiling: float) -> None:
    rng = random.Random(attempt)
    draws = [RetryPolicy().backoff(attempt, rng) for _ in range(2000)]
    assert all(0 <= d < ceiling for d in draws)
    assert max(draws) > 0.9 * ceiling  # spread over the whole range, not a fixed delay
    assert min(draws) < 0.1 * ceiling


def test_budget_allows_min_concurrency_then_a_percentage_of_load() -> None:
    budget = RetryBudget()
    assert [budget.try_acquire(active_requests=1) for _ in range(4)] == [True] * 3 + [False]
    assert budget.limit(100) == 20
    assert budget.try_acquire(active_requests=100)
    budget.release()
    budget.release()
    assert budget.active == 2


def test_budget_under_an_outage_caps_retries_at_the_budget() -> None:
    """1000 requests fail at once and each wants its retries: at most 20% of the load is
    ever retrying, whatever the per-route attempts."""
    budget = RetryBudget(budget_percent=20.0, min_concurrency=3)
    granted = sum(budget.try_acquire(active_requests=1000) for _ in range(1000 * 3))
    assert granted == 200
    for _ in range(granted):
        budget.release()
    budget.release()  # an extra release never goes negative
    assert budget.active == 0
