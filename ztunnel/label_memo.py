"""A connection's labels worked out once per pod, mesh state and what they depend on.

Per inbound tunnel the server derived, from the mesh state: the source workload by
address and its identity (a `SpiffeId` built and validated), the pod's workload, a scan
of every service for the one routing the port, and a fresh `ConnectionLabels`; per
outbound connection the client built the labels of the route decision. All of it depends
only on the key and on the state, which is immutable and replaced whole on every update
(`Ztunnel.update_state`): a new state object empties the memo. The memo also keeps
inbound tunnels' L4 authorization decisions (`authz.authorize`, ~2 % of the server's busy
time in a close run): each depends only on the state, the pod's workload in it and the
connection (source address and identity, destination address and port). Outbound
routing still runs for every connection (it picks an endpoint at random).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from mesh.api import mesh_pb2
from mesh.spiffe import SpiffeId, identity_of
from ztunnel import authz
from ztunnel.context import LocalPod, workload_labels
from ztunnel.metrics import ConnectionLabels
from ztunnel.route import OutboundDecision, Protocol
from ztunnel.state import MeshState

MAX_ENTRIES = 4096  # per direction, then it starts over: peers are pods, not ports
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Peering:
    workload: mesh_pb2.Workload  # the pod's, as this state describes it
    labels: ConnectionLabels


class LabelMemo:
    """One pod's memo; `PodProxy` owns it, so it ends with the pod."""

    def __init__(self, pod: LocalPod) -> None:
        self._pod = pod
        self._state: MeshState | None = None
        self._in: dict[tuple[str, SpiffeId, int], Peering] = {}
        self._decisions: dict[authz.Connection, authz.Decision] = {}
        self._out: dict[
            tuple[str | None, SpiffeId | None, str | None, Protocol], ConnectionLabels
        ] = {}

    def __len__(self) -> int:
        return len(self._in) + len(self._out) + len(self._decisions)

    def inbound(self, state: MeshState, peer_address: str, peer: SpiffeId, port: int) -> Peering:
        """The pod's workload and the labels of a tunnel from ``peer`` to ``port``."""
        self._follow(state)
        return _memoized(
            self._in,
            (peer_address, peer, port),
            lambda: self._inbound(state, peer_address, peer, port),
        )

    def authorize(
        self, state: MeshState, workload: mesh_pb2.Workload, conn: authz.Connection
    ) -> authz.Decision:
        """`authz.authorize` of a tunnel into the pod; ``workload``: `inbound`'s, the pod's
        in ``state``."""
        self._follow(state)
        return _memoized(self._decisions, conn, lambda: authz.authorize(state, workload, conn))

    def outbound(self, state: MeshState, decision: OutboundDecision) -> ConnectionLabels:
        """The labels of a connection from the pod routed by ``decision``."""
        self._follow(state)
        destination, service = decision.destination, decision.service
        key = (
            destination.uid if destination is not None else None,
            decision.expected_identity,
            service.hostname if service is not None else None,
            decision.protocol,
        )
        return _memoized(self._out, key, lambda: self._outbound(state, decision))

    def _follow(self, state: MeshState) -> None:
        if state is not self._state:
            self._state = state
            self._in.clear()
            self._out.clear()
            self._decisions.clear()

    def _inbound(self, state: MeshState, peer_address: str, peer: SpiffeId, port: int) -> Peering:
        source = state.by_address.get(peer_address)
        if source is not None and identity_of(source) != peer:
            source = None  # the address says one workload, the certificate another: trust neither
        workload = self._pod.workload(state)
        service = state.service_for(workload, port)
        labels = workload_labels(
            "destination", source, peer, workload, self._pod.identity, service, True
        )
        return Peering(workload, labels)

    def _outbound(self, state: MeshState, decision: OutboundDecision) -> ConnectionLabels:
        return workload_labels(
            "source",
            self._pod.workload(state),
            self._pod.identity,
            decision.destination,
            decision.expected_identity,
            decision.service,
            decision.protocol is Protocol.HBONE,
        )


def _memoized(entries: dict[K, V], key: K, derive: Callable[[], V]) -> V:
    found = entries.get(key)
    if found is None:
        if len(entries) >= MAX_ENTRIES:
            entries.clear()
        found = entries[key] = derive()
    return found
