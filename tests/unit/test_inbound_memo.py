"""ztunnel/inbound_memo.py: an inbound tunnel's labels worked out once per peer, port and
mesh state, with the same answers as working them out for every tunnel."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh.api import mesh_pb2, node_pb2
from mesh.netns import Netns
from mesh.spiffe import SpiffeId
from ztunnel import inbound_memo
from ztunnel.context import LocalPod
from ztunnel.inbound_memo import InboundMemo
from ztunnel.state import MeshState

SERVER = mesh_pb2.Workload(
    uid="uid-server", name="server-1", namespace="demo", service_account="server",
    addresses=["198.19.2.10"], workload_name="server",
)  # fmt: skip
CLIENT = mesh_pb2.Workload(
    uid="uid-client", name="client-1", namespace="demo", service_account="client",
    addresses=["198.19.1.10"], workload_name="client",
)  # fmt: skip
CLIENT_ID = SpiffeId("cluster.local", "demo", "client")
SERVICE = mesh_pb2.Service(
    name="server", namespace="demo", hostname="server.demo.svc.cluster.local",
    endpoint_uids=["uid-server"], ports=[mesh_pb2.ServicePort(port=80, target_port=8080)],
)  # fmt: skip


def state(*services: mesh_pb2.Service) -> MeshState:
    return MeshState(
        version="1",
        workloads={w.uid: w for w in (SERVER, CLIENT)},
        by_address={w.addresses[0]: w for w in (SERVER, CLIENT)},
        services_by_vip={f"10.96.0.{i}": s for i, s in enumerate(services, 1)},
    )


@pytest.fixture
def pod() -> Iterator[LocalPod]:
    info = node_pb2.PodInfo(uid="uid-server", name="server-1", namespace="demo",
                            service_account="server", addresses=["198.19.2.10"])  # fmt: skip
    with Netns.open("/proc/self/ns/net") as ns:
        yield LocalPod(info, ns, SpiffeId("cluster.local", "demo", "server"))


def test_labels_name_source_destination_and_service_and_are_kept(pod: LocalPod) -> None:
    memo, mesh = InboundMemo(pod), state(SERVICE)
    first = memo.lookup(mesh, "198.19.1.10", CLIENT_ID, 8080)
    labels = first.labels
    assert (labels.source_workload, labels.source_principal) == ("client", CLIENT_ID.uri)
    assert labels.destination_workload == "server"
    assert labels.destination_principal == pod.identity.uri
    assert labels.destination_service == "server.demo.svc.cluster.local"
    assert labels.connection_security_policy == "mutual_tls"
    assert first.workload is SERVER
    assert memo.lookup(mesh, "198.19.1.10", CLIENT_ID, 8080) is first
    assert memo.lookup(mesh, "198.19.1.10", CLIENT_ID, 9090).labels.destination_service == (
        "unknown"
    )


def test_an_address_whose_certificate_says_otherwise_is_no_source(pod: LocalPod) -> None:
    memo, mesh = InboundMemo(pod), state(SERVICE)
    assert memo.lookup(mesh, "198.19.1.10", CLIENT_ID, 8080).labels.source_workload == "client"
    other = SpiffeId("cluster.local", "other", "intruder")
    labels = memo.lookup(mesh, "198.19.1.10", other, 8080).labels
    assert (labels.source_workload, labels.source_principal) == ("unknown", other.uri)


def test_a_new_state_is_worked_out_anew(pod: LocalPod) -> None:
    memo = InboundMemo(pod)
    before = memo.lookup(state(), "198.19.1.10", CLIENT_ID, 8080)
    assert before.labels.destination_service == "unknown"
    after = memo.lookup(state(SERVICE), "198.19.1.10", CLIENT_ID, 8080)
    assert after.labels.destination_service == "server.demo.svc.cluster.local"
    assert len(memo) == 1  # the old state's entries are gone


def test_the_memo_is_bounded(pod: LocalPod, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inbound_memo, "MAX_ENTRIES", 3)
    memo, mesh = InboundMemo(pod), state(SERVICE)
    for port in range(1, 11):
        memo.lookup(mesh, "198.19.1.10", CLIENT_ID, port)
        assert len(memo) <= 3
