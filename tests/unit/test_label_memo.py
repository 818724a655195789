"""ztunnel/label_memo.py: a connection's labels (and an inbound tunnel's authorization)
worked out once per pod, mesh state and what they depend on, with the same answers as
working them out for every connection."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from mesh.api import mesh_pb2, node_pb2
from mesh.netns import Netns
from mesh.spiffe import SpiffeId
from tests.unit.test_authz import policies, src
from ztunnel import authz, label_memo
from ztunnel.authz import Connection
from ztunnel.context import LocalPod
from ztunnel.label_memo import LabelMemo
from ztunnel.route import OutboundDecision, Protocol
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
    memo, mesh = LabelMemo(pod), state(SERVICE)
    first = memo.inbound(mesh, "198.19.1.10", CLIENT_ID, 8080)
    labels = first.labels
    assert (labels.source_workload, labels.source_principal) == ("client", CLIENT_ID.uri)
    assert labels.destination_workload == "server"
    assert labels.destination_principal == pod.identity.uri
    assert labels.destination_service == "server.demo.svc.cluster.local"
    assert labels.connection_security_policy == "mutual_tls"
    assert first.workload is SERVER
    assert memo.inbound(mesh, "198.19.1.10", CLIENT_ID, 8080) is first
    assert memo.inbound(mesh, "198.19.1.10", CLIENT_ID, 9090).labels.destination_service == (
        "unknown"
    )


def test_an_address_whose_certificate_says_otherwise_is_no_source(pod: LocalPod) -> None:
    memo, mesh = LabelMemo(pod), state(SERVICE)
    assert memo.inbound(mesh, "198.19.1.10", CLIENT_ID, 8080).labels.source_workload == "client"
    other = SpiffeId("cluster.local", "other", "intruder")
    labels = memo.inbound(mesh, "198.19.1.10", other, 8080).labels
    assert (labels.source_workload, labels.source_principal) == ("unknown", other.uri)


def test_a_new_state_is_worked_out_anew(pod: LocalPod) -> None:
    memo = LabelMemo(pod)
    before = memo.inbound(state(), "198.19.1.10", CLIENT_ID, 8080)
    assert before.labels.destination_service == "unknown"
    after = memo.inbound(state(SERVICE), "198.19.1.10", CLIENT_ID, 8080)
    assert after.labels.destination_service == "server.demo.svc.cluster.local"
    assert len(memo) == 1  # the old state's entries are gone


def test_the_memo_is_bounded(pod: LocalPod, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(label_memo, "MAX_ENTRIES", 3)
    memo, mesh = LabelMemo(pod), state(SERVICE)
    for port in range(1, 11):
        memo.inbound(mesh, "198.19.1.10", CLIENT_ID, port)
        assert len(memo) <= 3


def to(destination: mesh_pb2.Workload | None, service: mesh_pb2.Service | None) -> OutboundDecision:
    if destination is None:
        identity, protocol = None, Protocol.TCP
    else:
        identity = SpiffeId("cluster.local", "demo", destination.service_account)
        protocol = Protocol.HBONE
    return OutboundDecision(protocol, ("198.19.2.10", 15008), "198.19.2.10:8080",
                            destination, identity, service)  # fmt: skip


def test_outbound_labels_follow_the_route_decision(pod: LocalPod) -> None:
    memo, mesh = LabelMemo(pod), state(SERVICE)
    labels = memo.outbound(mesh, to(CLIENT, SERVICE))
    assert labels.reporter == "source"
    assert (labels.source_workload, labels.source_principal) == ("server", pod.identity.uri)
    assert labels.destination_workload == "client"
    assert labels.destination_service == "server.demo.svc.cluster.local"
    assert labels.connection_security_policy == "mutual_tls"
    assert memo.outbound(mesh, to(CLIENT, SERVICE)) is labels
    direct = memo.outbound(mesh, to(CLIENT, None))
    assert direct.destination_service == "unknown" and direct is not labels
    plain = memo.outbound(mesh, to(None, None))
    assert (plain.destination_workload, plain.connection_security_policy) == ("unknown", "none")
    moved = memo.outbound(state(), to(CLIENT, SERVICE))  # a new state: worked out anew
    assert moved == labels and moved is not labels


def test_authorization_is_decided_once_per_state_and_connection(
    pod: LocalPod, monkeypatch: pytest.MonkeyPatch
) -> None:
    deny_client = {
        "demo": tuple(policies(src("DENY", principals=["cluster.local/ns/demo/sa/client"])))
    }
    allowing, denying = state(), dataclasses.replace(state(), authorization_policies=deny_client)
    conn = Connection("198.19.1.10", CLIENT_ID, "198.19.2.10", 8080)
    calls: list[Connection] = []
    real = authz.authorize

    def counted(mesh: MeshState, workload: mesh_pb2.Workload, c: Connection) -> authz.Decision:
        calls.append(c)
        return real(mesh, workload, c)

    monkeypatch.setattr(authz, "authorize", counted)
    memo = LabelMemo(pod)
    assert memo.authorize(allowing, SERVER, conn).allowed
    assert memo.authorize(allowing, SERVER, conn).allowed
    assert len(calls) == 1
    other = Connection("198.19.1.11", CLIENT_ID, "198.19.2.10", 8080)
    assert memo.authorize(allowing, SERVER, other).allowed and len(calls) == 2
    # A new state (the policy update) decides again: now denied, as authz.authorize says.
    decision = memo.authorize(denying, SERVER, conn)
    assert not decision.allowed and decision == real(denying, SERVER, conn)
    assert len(calls) == 3
