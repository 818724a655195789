"""Per-backend bookkeeping that outlives a request: the load balancer, outlier detector
and circuit breaker of each (Service, subset), and the token bucket of each rate-limited
Service. Kept across configuration updates while their policy is unchanged (active
request counts and ejections must survive an unrelated update), rebuilt when it changes."""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.api import mesh_pb2
from waypoint.balancer import Balancer, OutlierDetector
from waypoint.circuit import CircuitBreaker
from waypoint.ratelimit import TokenBucket
from waypoint.retry import RetryBudget
from waypoint.upstream import Endpoint


@dataclass
class Cluster:
    balancer: Balancer[Endpoint]
    outlier: OutlierDetector[Endpoint]
    circuit: CircuitBreaker
    policy: bytes  # the TrafficPolicy it was built from, serialized


def traffic_policy(
    destination: mesh_pb2.DestinationPolicy | None, subset: str
) -> mesh_pb2.TrafficPolicy:
    """The subset's policy (the controller merged it over the rule's), else the rule's."""
    if destination is None:
        return mesh_pb2.TrafficPolicy()
    for s in destination.subsets:
        if s.name == subset and s.HasField("policy"):
            return s.policy
    return destination.policy


class Clusters:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._clusters: dict[tuple[str, str], Cluster] = {}
        self._buckets: dict[str, tuple[bytes, TokenBucket]] = {}

    def cluster(
        self, service: str, subset: str, destination: mesh_pb2.DestinationPolicy | None
    ) -> Cluster:
        policy = traffic_policy(destination, subset)
        key = policy.SerializeToString(deterministic=True)
        found = self._clusters.get((service, subset))
        if found is not None and found.policy == key:
            return found
        outlier = policy.outlier_detection if policy.HasField("outlier_detection") else None
        pool = policy.connection_pool if policy.HasField("connection_pool") else None
        cluster = Cluster(
            Balancer(policy.load_balancer, self._rng),
            OutlierDetector(outlier),
            CircuitBreaker(pool, RetryBudget() if pool is None or not pool.max_retries else None),
            key,
        )
        self._clusters[(service, subset)] = cluster
        return cluster

    def allow(self, limit: mesh_pb2.RateLimit | None) -> bool:
        """Take a token from the Service's bucket (no RateLimit: always allowed)."""
        if limit is None or not limit.requests:
            return True
        key = limit.SerializeToString(deterministic=True)
        found = self._buckets.get(limit.service)
        if found is None or found[0] != key:
            found = (key, TokenBucket.from_proto(limit))
            self._buckets[limit.service] = found
        return found[1].take()
