"""The outbound decision: everything about where a captured connection goes, computed
before any I/O so a table of tests can check it without sockets."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh.api import mesh_pb2
from mesh.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from ztunnel.sockets import HBONE_PORT
from ztunnel.state import MeshState


class Protocol(enum.Enum):
    HBONE = "hbone"  # mTLS tunnel to the destination pod's ztunnel (or its waypoint)
    TCP = "tcp"  # plain TCP: destination outside the mesh or not enrolled


@dataclass(frozen=True)
class OutboundDecision:
    protocol: Protocol
    address: tuple[str, int]  # where to connect
    authority: str  # HBONE :authority (the endpoint the tunnel delivers to)
    destination: mesh_pb2.Workload | None
    expected_identity: SpiffeId | None
    service: mesh_pb2.Service | None
    waypoint: mesh_pb2.Waypoint | None = None


class NoHealthyEndpoint(LookupError):
    """A Service VIP with no endpoint for that port."""


def decide_outbound(
    state: MeshState,
    dst_ip: str,
    dst_port: int,
    pick: Callable[[Sequence[mesh_pb2.Workload]], mesh_pb2.Workload] = lambda ws: ws[0],
) -> OutboundDecision:
    service = state.services_by_vip.get(dst_ip)
    target_ip, target_port = dst_ip, dst_port
    destination = state.by_address.get(dst_ip)
    if service is not None:
        port = next((p for p in service.ports if p.port == dst_port), None)
        if port is None:
            raise NoHealthyEndpoint(f"service {service.hostname} has no port {dst_port}")
        via = state.waypoint_for(service.waypoint, "service")
        if via is not None:
            return _to_waypoint(via, pick, f"{dst_ip}:{dst_port}", service)
        endpoints = [state.workloads[u] for u in service.endpoint_uids if u in state.workloads]
        endpoints = [w for w in endpoints if w.addresses]
        if not endpoints:
            raise NoHealthyEndpoint(f"service {service.hostname} has no endpoints")
        destination = pick(endpoints)
        target_ip, target_port = destination.addresses[0], port.target_port or port.port
    authority = f"{target_ip}:{target_port}"
    via = state.waypoint_for(destination.waypoint, "workload") if destination else None
    if via is not None and destination is not None and destination.ambient:
        return _to_waypoint(via, pick, authority, service)
    if destination is not None and destination.ambient:
        return OutboundDecision(
            Protocol.HBONE,
            (target_ip, HBONE_PORT),
            authority,
            destination,
            state.identity(destination),
            service,
        )
    return OutboundDecision(
        Protocol.TCP, (target_ip, target_port), authority, destination, None, service
    )


def _to_waypoint(
    via: tuple[mesh_pb2.Waypoint, list[mesh_pb2.Workload]],
    pick: Callable[[Sequence[mesh_pb2.Workload]], mesh_pb2.Workload],
    authority: str,
    service: mesh_pb2.Service | None,
) -> OutboundDecision:
    """HBONE to an instance of the waypoint; :authority stays what the client dialed, so
    the waypoint routes by the Service (VIP:port) or the pod it was meant for."""
    waypoint, instances = via
    instance = pick(instances)
    return OutboundDecision(
        Protocol.HBONE,
        (instance.addresses[0], waypoint.hbone_port or HBONE_PORT),
        authority,
        instance,
        SpiffeId(
            waypoint.trust_domain or DEFAULT_TRUST_DOMAIN,
            waypoint.namespace,
            waypoint.service_account or "default",
        ),
        service,
        waypoint,
    )
