"""When a failed attempt is tried again, and after how long, as Envoy's router does for the
retry policy Istio writes from a VirtualService (``route/retry/retry.go``), so routes
behave as they would behind an Istio waypoint, including Istio's retries when the route
says nothing.

The request path classifies each failed attempt: an upstream response (status, and the
``grpc-status`` of a gRPC answer) or one of the error kinds below, then asks
:meth:`RetryPolicy.should_retry`; the number of tries, the per-try timeout and the
``previous_hosts`` exclusion are its loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.api import mesh_pb2

# How an attempt failed without a response (the request path's classification).
CONNECT_FAILURE = "connect-failure"  # could not reach the endpoint (dial or HBONE refused)
REFUSED_STREAM = "refused-stream"  # HTTP/2 REFUSED_STREAM: the request was never processed
RESET = "reset"  # the stream or connection died mid-request
TIMEOUT = "timeout"  # the per-try timeout fired (Envoy resets the attempt: like RESET)
OVERFLOW = "overflow"  # a circuit breaker refused the attempt: never retried

# Istio's retry policy for a route without ``retries`` (Istio >= 1.24 no longer retries 503
# by default: releasenotes 50506, EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY).
DEFAULT_ATTEMPTS = 2
DEFAULT_RETRY_ON = frozenset(
    {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
)
# Envoy's retry back-off: base 25 ms, max 10 x base (router filter docs, route.proto).
BACKOFF_BASE_SECONDS = 0.025
BACKOFF_MAX_FACTOR = 10
# Envoy's retry budget defaults (circuit_breaker.proto RetryBudget; Istio uses the same).
BUDGET_PERCENT = 20.0
MIN_RETRY_CONCURRENCY = 3

GATEWAY_ERRORS = frozenset({502, 503, 504})
CONFLICT = 409  # the only retriable-4xx
# retry_on names for gRPC statuses (Envoy's x-envoy-retry-grpc-on).
GRPC_RETRY_ON = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
_ANY_RESET = frozenset({"reset", "5xx", "gateway-error"})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = DEFAULT_ATTEMPTS  # retries after the first try
    retry_on: frozenset[str] = DEFAULT_RETRY_ON
    retriable_status_codes: frozenset[int] = frozenset()
    per_try_timeout_seconds: float = 0.0  # 0: none (the route timeout still holds)
    backoff_base_seconds: float = BACKOFF_BASE_SECONDS
    backoff_max_seconds: float = BACKOFF_BASE_SECONDS * BACKOFF_MAX_FACTOR

    @classmethod
    def from_proto(cls, retry: mesh_pb2.HttpRetry | None) -> RetryPolicy:
        """None (the route has no retry): Istio's default policy; ``attempts`` 0: no
        retries. A ``retry_on`` entry that is a number is a retriable status code, as
        Istio reads ``retryOn: 5xx,409``; an empty ``retry_on`` keeps Istio's default."""
        if retry is None:
            return cls()
        retry_on = set(DEFAULT_RETRY_ON)
        codes = set(retry.retriable_status_codes)
        if retry.retry_on:
            retry_on = {t.strip() for t in retry.retry_on if t.strip() and not t.strip().isdigit()}
            codes |= {int(t) for t in retry.retry_on if t.strip().isdigit()}
        if codes:
            retry_on.add("retriable-status-codes")
        base = retry.backoff_base_seconds or BACKOFF_BASE_SECONDS
        return cls(
            attempts=retry.attempts,
            retry_on=frozenset(retry_on),
            retriable_status_codes=frozenset(codes),
            per_try_timeout_seconds=retry.per_try_timeout_seconds,
            backoff_base_seconds=base,
            backoff_max_seconds=max(base, retry.backoff_max_seconds or base * BACKOFF_MAX_FACTOR),
        )

    def should_retry(
        self,
        status: int | None,
        error: str | None,
        *,
        grpc_status: int | None = None,
        request_sent: bool = True,
    ) -> bool:
        """Whether this failure is retriable under ``retry_on`` (Envoy's
        ``RetryStateImpl::wouldRetryFromHeaders`` / ``wouldRetryFromReset``); whether a try
        is left, and the budget, are the caller's to check."""
        if error is not None:
            return self._retry_reset(error, request_sent)
        if status is None:
            return False
        on = self.retry_on
        return (
            ("5xx" in on and 500 <= status <= 599)
            or ("gateway-error" in on and status in GATEWAY_ERRORS)
            or ("retriable-4xx" in on and status == CONFLICT)
            or ("retriable-status-codes" in on and status in self.retriable_status_codes)
            or (grpc_status is not None and _grpc_retriable(on, grpc_status))
        )

    def _retry_reset(self, error: str, request_sent: bool) -> bool:
        on = self.retry_on
        if error == OVERFLOW:
            return False
        return (
            (error == CONNECT_FAILURE and "connect-failure" in on)
            or ("reset-before-request" in on and not request_sent)
            or bool(on & _ANY_RESET)
            or (error == REFUSED_STREAM and "refused-stream" in on)
        )

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before the next retry, ``attempt`` being the number of retries
        already made (0 before the first): Envoy's fully jittered exponential back-off,
        uniform in [0, min(max, base * 2^attempt)) (``JitteredExponentialBackOffStrategy``:
        first retry below 25 ms, then 50, 100, 200, capped at 250 ms)."""
        interval = min(
            self.backoff_max_seconds, self.backoff_base_seconds * (1 << min(max(attempt, 0), 32))
        )
        return rng.random() * interval


def _grpc_retriable(retry_on: frozenset[str], grpc_status: int) -> bool:
    return any(GRPC_RETRY_ON.get(name) == grpc_status for name in retry_on)


class RetryBudget:
    """Envoy's retry budget: at most ``budget_percent`` of the cluster's active (and
    pending) requests may be retries at once, but never fewer than ``min_concurrency``,
    so retries cannot multiply the load on a cluster that is already failing."""

    def __init__(
        self, budget_percent: float = BUDGET_PERCENT, min_concurrency: int = MIN_RETRY_CONCURRENCY
    ) -> None:
        self.budget_percent = budget_percent
        self.min_concurrency = min_concurrency
        self.active = 0

    def limit(self, active_requests: int) -> int:
        return max(int(self.budget_percent / 100.0 * active_requests), self.min_concurrency)

    def try_acquire(self, active_requests: int) -> bool:
        """Take a retry slot; pair every True with one :meth:`release`."""
        if self.active >= self.limit(active_requests):
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active = max(0, self.active - 1)
