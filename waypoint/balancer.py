"""Which endpoint gets a request, and which endpoints are left out for misbehaving, decided
as Envoy does for the cluster Istio builds from a DestinationRule, so a policy written for
an Istio waypoint spreads load and ejects hosts the same way here.

Both classes are pure bookkeeping with an injected clock and RNG: the request path tells
them what happened (``started``/``finished``, ``record``) and asks (``pick``, ``healthy``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from mesh.api import mesh_pb2

E = TypeVar("E", bound=Hashable)
Clock = Callable[[], float]

# Envoy's OutlierDetection defaults (outlier_detection.proto); Istio leaves each unset
# when the DestinationRule does (cluster_traffic_policy.go applyOutlierDetection).
CONSECUTIVE_5XX = 5
INTERVAL_SECONDS = 10.0
BASE_EJECTION_SECONDS = 30.0
MAX_EJECTION_PERCENT = 10
MAX_EJECTION_SECONDS = 300.0
# Envoy's healthy_panic_threshold is 50%, but Istio sets it to the DestinationRule's
# minHealthPercent (default 0: panic mode off) whenever outlier detection is configured,
# because Kubernetes services often have too few pods for panic routing to make sense.
PANIC_THRESHOLD_PERCENT = 0.0
GATEWAY_ERRORS = frozenset({502, 503, 504})


class Balancer(Generic[E]):
    """One load balancer per backend cluster (a Service port or a subset of it).

    ``LEAST_REQUEST`` (Istio's default) is Envoy's power of two choices: two endpoints drawn
    at random (with replacement), the one with fewer active requests wins, ties to the
    first. ``ROUND_ROBIN`` starts at a random offset, as Envoy does, so waypoint replicas do
    not march over the endpoints in step.
    """

    def __init__(
        self, policy: mesh_pb2.LoadBalancer.ValueType, rng: random.Random | None = None
    ) -> None:
        self.policy = policy
        self._rng = rng or random.Random()
        self._active: dict[E, int] = {}
        self._next = self._rng.randrange(1 << 16)

    def pick(self, endpoints: Sequence[E], exclude: Collection[E] = ()) -> E | None:
        """An endpoint, avoiding ``exclude`` (the hosts a retry already tried: Istio's
        ``previous_hosts`` predicate) unless nothing else is left; None when there is none."""
        candidates = [e for e in endpoints if e not in exclude] if exclude else endpoints
        if not candidates:
            candidates = endpoints
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        if self.policy == mesh_pb2.ROUND_ROBIN:
            chosen = candidates[self._next % len(candidates)]
            self._next += 1
            return chosen
        if self.policy == mesh_pb2.RANDOM:
            return candidates[self._rng.randrange(len(candidates))]
        first = candidates[self._rng.randrange(len(candidates))]
        second = candidates[self._rng.randrange(len(candidates))]
        return second if self.active(second) < self.active(first) else first

    def active(self, endpoint: E) -> int:
        return self._active.get(endpoint, 0)

    def started(self, endpoint: E) -> None:
        self._active[endpoint] = self.active(endpoint) + 1

    def finished(self, endpoint: E) -> None:
        left = self.active(endpoint) - 1
        if left > 0:
            self._active[endpoint] = left
        else:
            self._active.pop(endpoint, None)


@dataclass
class _Host:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    # Envoy's ejectTimeBackoff: grows by one per ejection, shrinks by one per healthy sweep.
    backoff: int = 0
    ejected_at: float | None = None


class OutlierDetector(Generic[E]):
    """Envoy's consecutive-errors outlier detection for one cluster (no success-rate
    detection: Istio turns it off).

    A response of 5xx counts toward ``consecutive_5xx_errors``; 502/503/504 also toward
    ``consecutive_gateway_errors``; a connect failure, reset or timeout (``error=True``)
    counts as both, as Envoy maps local-origin errors to 5xx unless told to split them;
    any other response resets both counts. Reaching a threshold ejects the endpoint unless
    ``max_ejection_percent`` of the cluster is already ejected (so the first ejection always
    happens). Like Envoy, ejections end only at interval sweeps (every ``interval_seconds``
    from creation), once ``min(base_ejection * backoff, 300 s)`` has passed.

    Unset (0) fields take Envoy's defaults, except ``consecutive_gateway_errors`` which is
    off unless set (Envoy's enforcing_consecutive_gateway_failure defaults to 0%).
    ``config=None`` (no outlierDetection in the DestinationRule) disables detection, as in
    Istio. :meth:`healthy` must be given the whole cluster, which is also what the
    ejection percentage is measured against.
    """

    def __init__(
        self,
        config: mesh_pb2.OutlierDetection | None,
        clock: Clock = time.monotonic,
        *,
        panic_threshold_percent: float = PANIC_THRESHOLD_PERCENT,
    ) -> None:
        self.enabled = config is not None
        config = config or mesh_pb2.OutlierDetection()
        self.consecutive_5xx = config.consecutive_5xx_errors or CONSECUTIVE_5XX
        self.consecutive_gateway = config.consecutive_gateway_errors  # 0: off
        self.interval = config.interval_seconds or INTERVAL_SECONDS
        self.base_ejection = config.base_ejection_seconds or BASE_EJECTION_SECONDS
        self.max_ejection_percent = min(100, config.max_ejection_percent or MAX_EJECTION_PERCENT)
        self.panic_threshold_percent = panic_threshold_percent
        self._clock = clock
        self._next_sweep = clock() + self.interval
        self._hosts: dict[E, _Host] = {}
        self._cluster_size = 0

    def record(self, endpoint: E, status: int | None, error: bool) -> None:
        """The outcome of one upstream attempt: the endpoint's response status, or
        ``error`` when no response came (connect failure, reset, timeout)."""
        if not self.enabled or (status is None and not error):
            return
        self._sweep()
        host = self._hosts.setdefault(endpoint, _Host())
        if not error and status is not None and status < 500:
            host.consecutive_5xx = host.consecutive_gateway = 0
            return
        gateway = error or status in GATEWAY_ERRORS
        host.consecutive_gateway = host.consecutive_gateway + 1 if gateway else 0
        host.consecutive_5xx += 1
        if host.consecutive_5xx >= self.consecutive_5xx:
            host.consecutive_5xx = 0
            self._eject(host)
        if self.consecutive_gateway and host.consecutive_gateway >= self.consecutive_gateway:
            host.consecutive_gateway = 0
            self._eject(host)

    def ejected(self, endpoint: E) -> bool:
        self._sweep()
        return self._is_ejected(endpoint)

    def healthy(self, endpoints: Sequence[E]) -> list[E]:
        """The endpoints not ejected; all of them in panic (fewer healthy than the panic
        threshold, 0 % by default: never). Forgets endpoints no longer in the cluster."""
        if not self.enabled:
            return list(endpoints)
        self._sweep()
        self._cluster_size = len(endpoints)
        current = set(endpoints)
        for gone in [e for e in self._hosts if e not in current]:
            del self._hosts[gone]
        healthy = [e for e in endpoints if not self._is_ejected(e)]
        if 100 * len(healthy) < self.panic_threshold_percent * len(endpoints):
            return list(endpoints)
        return healthy

    def _is_ejected(self, endpoint: E) -> bool:
        host = self._hosts.get(endpoint)
        return host is not None and host.ejected_at is not None

    def _eject(self, host: _Host) -> None:
        if host.ejected_at is not None:
            return
        ejected = sum(h.ejected_at is not None for h in self._hosts.values())
        size = max(self._cluster_size, len(self._hosts))
        if 100 * ejected / size >= self.max_ejection_percent:
            return
        host.ejected_at = self._clock()
        if host.backoff * self.base_ejection < MAX_EJECTION_SECONDS + self.base_ejection:
            host.backoff += 1

    def _sweep(self) -> None:
        """Run the interval sweeps that fell due since the last call, in order."""
        now = self._clock()
        while self._next_sweep <= now:
            at = self._next_sweep
            self._next_sweep += self.interval
            busy = False
            for host in self._hosts.values():
                if host.ejected_at is None:
                    host.backoff = max(0, host.backoff - 1)
                elif at - host.ejected_at >= self._ejection_seconds(host):
                    host.ejected_at = None
                busy = busy or host.ejected_at is not None or host.backoff > 0
            if not busy:  # every later sweep would find nothing to do
                skipped = (now - self._next_sweep) // self.interval + 1
                self._next_sweep += max(0.0, skipped) * self.interval

    def _ejection_seconds(self, host: _Host) -> float:
        return min(self.base_ejection * host.backoff, max(MAX_EJECTION_SECONDS, self.base_ejection))
