"""What ztunnel knows of the mesh, indexed for the data path. Built whole from each
controller snapshot and swapped atomically, so a connection sees one consistent view."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.api import mesh_pb2
from mesh.spiffe import SpiffeId

DEFAULT_TRUST_DOMAIN = "cluster.local"


def identity_of(workload: mesh_pb2.Workload) -> SpiffeId:
    return SpiffeId(
        workload.trust_domain or DEFAULT_TRUST_DOMAIN,
        workload.namespace,
        workload.service_account or "default",
    )


@dataclass(frozen=True)
class MeshState:
    version: str = ""
    workloads: Mapping[str, mesh_pb2.Workload] = field(default_factory=dict)
    by_address: Mapping[str, mesh_pb2.Workload] = field(default_factory=dict)
    services_by_vip: Mapping[str, mesh_pb2.Service] = field(default_factory=dict)
    peer_authentications: tuple[mesh_pb2.PeerAuthentication, ...] = ()

    @classmethod
    def build(cls, version: str, resources: Mapping[str, mesh_pb2.Resource]) -> MeshState:
        workloads: dict[str, mesh_pb2.Workload] = {}
        by_address: dict[str, mesh_pb2.Workload] = {}
        services: dict[str, mesh_pb2.Service] = {}
        policies = []
        for res in resources.values():
            kind = res.WhichOneof("kind")
            if kind == "workload":
                workloads[res.workload.uid] = res.workload
                for addr in res.workload.addresses:
                    by_address[addr] = res.workload
            elif kind == "service":
                for vip in res.service.addresses:
                    services[vip] = res.service
            elif kind == "peer_authentication":
                policies.append(res.peer_authentication)
        return cls(version, workloads, by_address, services, tuple(policies))

    def mtls_mode(self, workload: mesh_pb2.Workload, port: int) -> int:
        """Effective PeerAuthentication mode: workload selector > namespace > mesh; port-level
        settings of the winning policy override its default. PERMISSIVE when nothing says."""
        best: mesh_pb2.PeerAuthentication | None = None
        rank = {mesh_pb2.MESH: 1, mesh_pb2.NAMESPACE: 2, mesh_pb2.WORKLOAD: 3}
        for pa in self.peer_authentications:
            if pa.scope == mesh_pb2.MESH:
                applies = True
            elif pa.namespace != workload.namespace:
                applies = False
            elif pa.scope == mesh_pb2.WORKLOAD:
                applies = all(workload.labels.get(k) == v for k, v in pa.selector.items())
            else:
                applies = True
            if not applies:
                continue
            if (
                best is None
                or rank.get(pa.scope, 0) > rank.get(best.scope, 0)
                or (
                    pa.scope == best.scope and (pa.namespace, pa.name) < (best.namespace, best.name)
                )
            ):
                best = pa
        if best is None:
            return mesh_pb2.PERMISSIVE
        mode = best.port_modes.get(port, best.mode)
        if mode == mesh_pb2.MTLS_MODE_UNSET:
            # UNSET inherits from the parent scope; only mesh-wide has no parent.
            parent = MeshState(
                self.version,
                self.workloads,
                self.by_address,
                self.services_by_vip,
                tuple(p for p in self.peer_authentications if p is not best),
            )
            return parent.mtls_mode(workload, port)
        return mode
