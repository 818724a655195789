"""What every listener of every pod shares (current mesh state, certificates, metrics),
and what belongs to one pod only (its netns, its HBONE pool)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.api import mesh_pb2, node_pb2
from mesh.cert_manager import CertManager
from mesh.netns import Netns
from mesh.pool import HboneConnectionPool
from mesh.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from ztunnel.connections import ConnectionTable
from ztunnel.fastpath_maps import SameNodeFastPath
from ztunnel.metrics import ConnectionLabels
from ztunnel.state import MeshState

# (destination identity, destination address): one mTLS connection each, per source pod
PoolKey = tuple[SpiffeId, str]


@dataclass
class ProxyContext:
    certs: CertManager
    connections: ConnectionTable
    state: MeshState = field(default_factory=MeshState)
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    fast_path: SameNodeFastPath | None = None  # None: --same-node-fast-path is off
    local_pods: dict[str, LocalPod] = field(default_factory=dict)  # by uid, this node's


@dataclass(frozen=True)
class LocalPod:
    """A pod of this node as the agent described it.

    Owns a handle on its netns and the HBONE connections dialed from it: the pool is the
    pod's, not the node's, because those connections carry the pod's source address and
    must end with the pod (Istio's ztunnel keys its pool by source workload too).
    """

    info: node_pb2.PodInfo
    netns: Netns
    identity: SpiffeId
    pool: HboneConnectionPool[PoolKey] = field(default_factory=HboneConnectionPool)
    # Closers of same-node fast-path connections into this pod (made by the source pod's
    # handlers): they end with this pod, as its accepted HBONE connections do.
    fast_inbound: set[Callable[[], None]] = field(default_factory=set, compare=False)

    @classmethod
    def adopt(cls, info: node_pb2.PodInfo, netns_fd: int, trust_domain: str) -> LocalPod:
        """Take a dup of the agent's (borrowed) netns fd."""
        sid = SpiffeId(trust_domain, info.namespace, info.service_account or "default")
        return cls(info, Netns.dup(netns_fd, f"pod {info.namespace}/{info.name}"), sid)

    @property
    def ref(self) -> str:
        return f"{self.info.namespace}/{self.info.name}"

    def workload(self, state: MeshState) -> mesh_pb2.Workload:
        """The controller's view of this pod, or a minimal stand-in built from the agent's."""
        known = state.workloads.get(self.info.uid)
        if known is not None:
            return known
        return mesh_pb2.Workload(
            uid=self.info.uid,
            name=self.info.name,
            namespace=self.info.namespace,
            service_account=self.info.service_account,
            addresses=list(self.info.addresses),
            ambient=True,
            workload_name=self.info.name,
        )


def workload_labels(
    reporter: str,
    source: mesh_pb2.Workload | None,
    source_principal: SpiffeId | None,
    destination: mesh_pb2.Workload | None,
    destination_principal: SpiffeId | None,
    service: mesh_pb2.Service | None,
    mtls: bool,
) -> ConnectionLabels:
    unknown = "unknown"
    return ConnectionLabels(
        reporter=reporter,
        source_workload=(source.workload_name or source.name) if source else unknown,
        source_workload_namespace=source.namespace if source else unknown,
        source_principal=source_principal.uri if source_principal else unknown,
        destination_workload=(destination.workload_name or destination.name)
        if destination
        else unknown,
        destination_workload_namespace=destination.namespace if destination else unknown,
        destination_principal=destination_principal.uri if destination_principal else unknown,
        destination_service=service.hostname if service else unknown,
        connection_security_policy="mutual_tls" if mtls else "none",
    )
