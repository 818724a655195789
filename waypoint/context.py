"""Who is calling and what they addressed: fixed per tunnel, shared by its requests."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.api import mesh_pb2
from mesh.spiffe import SpiffeId
from waypoint.state import WaypointState


@dataclass(frozen=True)
class Target:
    """The tunnel's `:authority`: a Service port this waypoint serves, or a pod that uses
    this waypoint for its own traffic (waypoint-for workload)."""

    port: int
    service: mesh_pb2.Service | None = None
    workload: mesh_pb2.Workload | None = None


@dataclass(frozen=True)
class Downstream:
    peer: SpiffeId
    address: str | None
    # The calling workload, if its address and identity agree.
    source: mesh_pb2.Workload | None
    target: Target


def resolve(state: WaypointState, waypoint: str, host: str, port: int) -> Target | None:
    """What `host:port` names for waypoint `<namespace>/<name>`; None: not ours to serve."""
    service = state.services_by_vip.get(host)
    if service is not None:
        if service.waypoint != waypoint or not any(p.port == port for p in service.ports):
            return None
        return Target(port, service=service)
    workload = state.by_address.get(host)
    if workload is not None and workload.waypoint == waypoint:
        return Target(port, workload=workload)
    return None
