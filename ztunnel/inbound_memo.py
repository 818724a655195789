"""What an inbound HBONE tunnel's labels need from the mesh state, worked out once per
(peer address, peer identity, port) of a pod and mesh state.

Per tunnel this was ~15-20 µs of the server's ~650 µs: the source workload by address
and its identity (a `SpiffeId` built and validated), the pod's workload, a scan of every
service for the one routing the port, and a fresh `ConnectionLabels`. All of it depends
only on the key and on the state, which is immutable and replaced whole on every update
(`Ztunnel.update_state`): a new state object empties the memo. Authorization is not
memoized; it runs for every tunnel.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.api import mesh_pb2
from mesh.spiffe import SpiffeId, identity_of
from ztunnel.context import LocalPod, workload_labels
from ztunnel.metrics import ConnectionLabels
from ztunnel.state import MeshState

MAX_ENTRIES = 4096  # then the memo starts over: peers are pods, not client ports


@dataclass(frozen=True, slots=True)
class Peering:
    workload: mesh_pb2.Workload  # the pod's, as this state describes it
    labels: ConnectionLabels


class InboundMemo:
    """One pod's memo; `PodProxy` owns it, so it ends with the pod."""

    def __init__(self, pod: LocalPod) -> None:
        self._pod = pod
        self._state: MeshState | None = None
        self._entries: dict[tuple[str, SpiffeId, int], Peering] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, state: MeshState, peer_address: str, peer: SpiffeId, port: int) -> Peering:
        if state is not self._state:
            self._state = state
            self._entries.clear()
        key = (peer_address, peer, port)
        found = self._entries.get(key)
        if found is None:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            found = self._entries[key] = self._derive(state, peer_address, peer, port)
        return found

    def _derive(self, state: MeshState, peer_address: str, peer: SpiffeId, port: int) -> Peering:
        source = state.by_address.get(peer_address)
        if source is not None and identity_of(source) != peer:
            source = None  # the address says one workload, the certificate another: trust neither
        workload = self._pod.workload(state)
        service = state.service_for(workload, port)
        labels = workload_labels(
            "destination", source, peer, workload, self._pod.identity, service, True
        )
        return Peering(workload, labels)
