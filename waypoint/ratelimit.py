"""The local rate limit of a Service (ambimesh.io/v1alpha1 RateLimit): a token bucket per
waypoint replica, as Envoy's local_ratelimit filter keeps one, so a burst is absorbed up to
the bucket's size and the steady rate is ``requests`` per ``per_seconds``. A request that
finds the bucket empty is answered 429 with flag ``RL``.

Unlike Envoy, which adds ``tokens_per_fill`` at each ``fill_interval``, tokens refill
continuously: the same average rate without a thundering step at every interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mesh.api import mesh_pb2
from waypoint.flags import ResponseFlag

STATUS = 429
FLAG = ResponseFlag.RATE_LIMITED


class TokenBucket:
    """``burst`` tokens at most (0: ``requests``, one period's worth), full at start."""

    def __init__(
        self,
        requests: int,
        per_seconds: float,
        burst: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = float(burst or requests)
        self.rate = requests / (per_seconds or 1.0)  # tokens per second
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()

    @classmethod
    def from_proto(
        cls, limit: mesh_pb2.RateLimit, clock: Callable[[], float] = time.monotonic
    ) -> TokenBucket:
        """``per_seconds`` 0 means one second."""
        return cls(limit.requests, limit.per_seconds, limit.burst, clock)

    def take(self) -> bool:
        """Spend one token; False (answer 429) when there is none."""
        now = self._clock()
        elapsed = max(0.0, now - self._at)
        self._at = now
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
