"""What ztunnel knows of the mesh, indexed for the data path. Built whole from each
controller snapshot and swapped atomically, so a connection sees one consistent view."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.api import mesh_pb2
from mesh.mesh_index import MeshIndex
from mesh.spiffe import SpiffeId, identity_of


@dataclass(frozen=True)
class MeshState:
    version: str = ""
    workloads: Mapping[str, mesh_pb2.Workload] = field(default_factory=dict)
    by_address: Mapping[str, mesh_pb2.Workload] = field(default_factory=dict)
    services_by_vip: Mapping[str, mesh_pb2.Service] = field(default_factory=dict)
    peer_authentications: tuple[mesh_pb2.PeerAuthentication, ...] = ()
    # By namespace; mesh-wide ones (root namespace) under "".
    authorization_policies: Mapping[str, tuple[mesh_pb2.AuthorizationPolicy, ...]] = field(
        default_factory=dict
    )
    # By "<namespace>/<name>", as Service.waypoint and Workload.waypoint name them.
    waypoints: Mapping[str, mesh_pb2.Waypoint] = field(default_factory=dict)
    # Identities of this state's workloads by uid, made on first use: a `SpiffeId` is
    # validated by three regular expressions, ~7 µs on every outbound connection.
    _identities: dict[str, SpiffeId] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    @classmethod
    def build(cls, version: str, resources: Mapping[str, mesh_pb2.Resource]) -> MeshState:
        index = MeshIndex.build(resources)
        policies = []
        authorizations: dict[str, list[mesh_pb2.AuthorizationPolicy]] = {}
        for res in resources.values():
            kind = res.WhichOneof("kind")
            if kind == "peer_authentication":
                policies.append(res.peer_authentication)
            elif kind == "authorization_policy":
                ap = res.authorization_policy
                ns = "" if ap.scope == mesh_pb2.MESH else ap.namespace
                authorizations.setdefault(ns, []).append(ap)
        by_namespace = {
            ns: tuple(sorted(aps, key=lambda ap: (ap.namespace, ap.name)))
            for ns, aps in authorizations.items()
        }
        return cls(
            version,
            index.workloads,
            index.by_address,
            index.services_by_vip,
            tuple(policies),
            by_namespace,
            index.waypoints,
        )

    def identity(self, workload: mesh_pb2.Workload) -> SpiffeId:
        """`identity_of(workload)`, kept for the workloads of this state."""
        uid = workload.uid
        if self.workloads.get(uid) is not workload:
            return identity_of(workload)
        found = self._identities.get(uid)
        if found is None:
            found = self._identities[uid] = identity_of(workload)
        return found

    def waypoint_for(
        self, ref: str, traffic: str
    ) -> tuple[mesh_pb2.Waypoint, list[mesh_pb2.Workload]] | None:
        """The waypoint ``ref`` names if it takes ``traffic`` ("service" or "workload") and
        has instances, with those instances."""
        waypoint = self.waypoints.get(ref) if ref else None
        if waypoint is None or (waypoint.traffic_type or "service") not in (traffic, "all"):
            return None
        instances = [self.by_address[a] for a in waypoint.addresses if a in self.by_address]
        return (waypoint, instances) if instances else None

    def authorization_policies_for(
        self, workload: mesh_pb2.Workload
    ) -> tuple[mesh_pb2.AuthorizationPolicy, ...]:
        """The workload's namespace's and the mesh-wide policies (selectors not yet applied)."""
        return self.authorization_policies.get(workload.namespace, ()) + (
            self.authorization_policies.get("", ())
        )

    def service_for(self, workload: mesh_pb2.Workload, target_port: int) -> mesh_pb2.Service | None:
        """A service that routes ``target_port`` to this workload (for destination_service)."""
        for service in self.services_by_vip.values():
            if workload.uid in service.endpoint_uids and any(
                (p.target_port or p.port) == target_port for p in service.ports
            ):
                return service
        return None

    def mtls_mode(self, workload: mesh_pb2.Workload, port: int) -> int:
        """Effective PeerAuthentication mode, composed as Istio does: mesh, then namespace,
        then workload policy, each overriding the one before unless UNSET; a policy's port
        setting overrides its own mode. PERMISSIVE when nothing says otherwise."""
        mode: int = mesh_pb2.PERMISSIVE
        for scope in (mesh_pb2.MESH, mesh_pb2.NAMESPACE, mesh_pb2.WORKLOAD):
            policy = self._policy_for(workload, scope)
            if policy is None:
                continue
            for candidate in (policy.mode, policy.port_modes.get(port, mesh_pb2.MTLS_MODE_UNSET)):
                if candidate != mesh_pb2.MTLS_MODE_UNSET:
                    mode = candidate
        return mode

    def _policy_for(
        self, workload: mesh_pb2.Workload, scope: int
    ) -> mesh_pb2.PeerAuthentication | None:
        """The policy of one scope that applies; ties go to the first by namespace/name."""
        matching = [
            pa
            for pa in self.peer_authentications
            if pa.scope == scope
            and (scope == mesh_pb2.MESH or pa.namespace == workload.namespace)
            and all(workload.labels.get(k) == v for k, v in pa.selector.items())
        ]
        return min(matching, key=lambda pa: (pa.namespace, pa.name), default=None)
