"""Istio's fault injection (VirtualService ``fault``) as Envoy's fault filter applies it:
for each request the delay and the abort are drawn independently, the delay first, so a
request can be both delayed (flag ``DI``) and then aborted (flag ``FI``) without ever
reaching an endpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mesh.api import mesh_pb2
from waypoint.flags import ResponseFlag


@dataclass(frozen=True)
class FaultDecision:
    delay_seconds: float = 0.0
    abort_status: int | None = None  # answer with this status instead of forwarding

    @property
    def flags(self) -> tuple[ResponseFlag, ...]:
        flags = []
        if self.delay_seconds > 0:
            flags.append(ResponseFlag.DELAY_INJECTED)
        if self.abort_status is not None:
            flags.append(ResponseFlag.FAULT_INJECTED)
        return tuple(flags)


NO_FAULT = FaultDecision()


def decide(fault: mesh_pb2.HttpFault | None, rng: random.Random) -> FaultDecision:
    """A delay with ``delay_percent`` 0 applies to every request (the API contract); an
    abort applies to ``abort_percent`` of requests, none when it is 0 (Istio: "if not
    specified, no request will be aborted")."""
    if fault is None:
        return NO_FAULT
    delay = 0.0
    if fault.delay_seconds > 0 and _drawn(fault.delay_percent or 100.0, rng):
        delay = fault.delay_seconds
    abort = None
    if fault.abort_status and _drawn(fault.abort_percent, rng):
        abort = fault.abort_status
    return FaultDecision(delay, abort)


def _drawn(percent: float, rng: random.Random) -> bool:
    return rng.random() * 100.0 < percent
