"""Envoy's circuit breakers for one backend cluster, from a DestinationRule's connection
pool settings: past a limit the request fails fast (503, flag ``UO``) instead of queueing
behind an endpoint that is already drowning.

Istio maps ``http2MaxRequests`` to max_requests, ``http1MaxPendingRequests`` to
max_pending_requests, ``maxRetries`` to max_retries and ``tcp.maxConnections`` to
max_connections; whatever the rule leaves unset Istio sets to 2^32-1
(``getDefaultCircuitBreakerThresholds``: Envoy's own defaults, 1024 and 3 retries, tripped
during rolling updates), so 0 in the proto means unlimited here.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.api import mesh_pb2
from waypoint.flags import ResponseFlag
from waypoint.retry import RetryBudget

UNLIMITED = 2**32 - 1


class Overflow(Exception):
    """A limit is full: answer 503 with :attr:`flag` and do not retry the attempt."""

    flag = ResponseFlag.UPSTREAM_OVERFLOW

    def __init__(self, limit: str, value: int) -> None:
        super().__init__(f"{limit} ({value}) reached")
        self.limit = limit


@dataclass
class _Gauge:
    name: str
    max: int
    count: int = 0

    def try_enter(self) -> bool:
        if self.count >= self.max:
            return False
        self.count += 1
        return True

    def enter(self) -> None:
        if not self.try_enter():
            raise Overflow(self.name, self.max)

    def exit(self) -> None:
        self.count = max(0, self.count - 1)


class CircuitBreaker:
    """Counts what is in flight to one cluster; every ``enter``/successful ``try`` is paired
    with its ``exit`` by the caller (in a ``finally``).

    - ``enter_request``: around each upstream attempt (retries are requests too);
    - ``enter_pending``: while an attempt waits for a connection to the endpoint;
    - ``try_connection``: before opening a new upstream connection (False: reuse or queue);
    - ``try_retry``: before each retry; with a :class:`RetryBudget` the budget replaces
      max_retries and is measured against the active plus pending requests, as in Envoy.
    """

    def __init__(
        self, pool: mesh_pb2.ConnectionPool | None = None, budget: RetryBudget | None = None
    ) -> None:
        pool = pool or mesh_pb2.ConnectionPool()
        self.requests = _Gauge("max_requests", pool.max_requests or UNLIMITED)
        self.pending = _Gauge("max_pending_requests", pool.max_pending_requests or UNLIMITED)
        self.connections = _Gauge("max_connections", pool.max_connections or UNLIMITED)
        self.retries = _Gauge("max_retries", pool.max_retries or UNLIMITED)
        self.budget = budget

    def enter_request(self) -> None:
        self.requests.enter()

    def exit_request(self) -> None:
        self.requests.exit()

    def enter_pending(self) -> None:
        self.pending.enter()

    def exit_pending(self) -> None:
        self.pending.exit()

    def try_connection(self) -> bool:
        return self.connections.try_enter()

    def exit_connection(self) -> None:
        self.connections.exit()

    def try_retry(self) -> bool:
        """False: no retry now (Envoy's upstream_rq_retry_overflow); the caller answers
        with the failure it has."""
        if self.budget is not None:
            return self.budget.try_acquire(self.requests.count + self.pending.count)
        return self.retries.try_enter()

    def exit_retry(self) -> None:
        if self.budget is not None:
            self.budget.release()
        else:
            self.retries.exit()
