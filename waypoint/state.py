"""What a waypoint knows of the mesh, indexed for the request path. Built whole from each
controller snapshot and swapped atomically, so a request sees one consistent view."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.api import mesh_pb2
from mesh.mesh_index import MeshIndex
from mesh.spiffe import SpiffeId, identity_of


def target_port(service: mesh_pb2.Service, port: int) -> int | None:
    """The pods' port behind Service port `port` (None: the Service has no such port)."""
    for p in service.ports:
        if p.port == port:
            return p.target_port or p.port
    return None


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class WaypointState:
    version: str = ""
    workloads: Mapping[str, mesh_pb2.Workload] = field(default_factory=dict)
    by_address: Mapping[str, mesh_pb2.Workload] = field(default_factory=dict)
    services_by_vip: Mapping[str, mesh_pb2.Service] = field(default_factory=dict)
    services_by_host: Mapping[str, mesh_pb2.Service] = field(default_factory=dict)
    # (service hostname, port); port 0: every port of the Service.
    routes: Mapping[tuple[str, int], mesh_pb2.HttpRouteTable] = field(default_factory=dict)
    destination_policies: Mapping[str, mesh_pb2.DestinationPolicy] = field(default_factory=dict)
    rate_limits: Mapping[str, mesh_pb2.RateLimit] = field(default_factory=dict)
    authorization_policies: tuple[mesh_pb2.HttpAuthorizationPolicy, ...] = ()
    # By "<namespace>/<name>".
    waypoints: Mapping[str, mesh_pb2.Waypoint] = field(default_factory=dict)

    @classmethod
    def build(cls, version: str, resources: Mapping[str, mesh_pb2.Resource]) -> WaypointState:
        index = MeshIndex.build(resources)
        by_host: dict[str, mesh_pb2.Service] = {}
        routes: dict[tuple[str, int], mesh_pb2.HttpRouteTable] = {}
        destinations: dict[str, mesh_pb2.DestinationPolicy] = {}
        rate_limits: dict[str, mesh_pb2.RateLimit] = {}
        authz: list[mesh_pb2.HttpAuthorizationPolicy] = []
        for res in resources.values():
            kind = res.WhichOneof("kind")
            if kind == "service":
                by_host[res.service.hostname] = res.service
            elif kind == "http_routes":
                routes[(res.http_routes.service, res.http_routes.port)] = res.http_routes
            elif kind == "destination_policy":
                destinations[res.destination_policy.service] = res.destination_policy
            elif kind == "rate_limit":
                rate_limits[res.rate_limit.service] = res.rate_limit
            elif kind == "http_authorization_policy":
                authz.append(res.http_authorization_policy)
        authz.sort(key=lambda p: (p.namespace, p.name))
        return cls(
            version,
            index.workloads,
            index.by_address,
            index.services_by_vip,
            by_host,
            routes,
            destinations,
            rate_limits,
            tuple(authz),
            index.waypoints,
        )

    def route_table(self, service: str, port: int) -> mesh_pb2.HttpRouteTable | None:
        return self.routes.get((service, port)) or self.routes.get((service, 0))

    def endpoints(
        self, service: mesh_pb2.Service, subset_labels: Mapping[str, str] | None = None
    ) -> list[mesh_pb2.Workload]:
        """The Service's pods with an address, narrowed to those carrying `subset_labels`."""
        found = []
        for uid in service.endpoint_uids:
            workload = self.workloads.get(uid)
            if workload is None or not workload.addresses:
                continue
            if subset_labels and not labels_match(subset_labels, workload.labels):
                continue
            found.append(workload)
        return found

    def source_workload(self, address: str | None, peer: SpiffeId) -> mesh_pb2.Workload | None:
        """The workload a tunnel came from, only if its identity is the peer's (an address
        alone proves nothing)."""
        workload = self.by_address.get(address or "")
        if workload is None or identity_of(workload) != peer:
            return None
        return workload
