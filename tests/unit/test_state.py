"""MeshState.mtls_mode: which PeerAuthentication wins for a workload and port."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from mesh.api import mesh_pb2
from ztunnel.state import MeshState

UNSET = mesh_pb2.MTLS_MODE_UNSET
PERMISSIVE = mesh_pb2.PERMISSIVE
STRICT = mesh_pb2.STRICT
DISABLE = mesh_pb2.DISABLE
MESH = mesh_pb2.MESH
NAMESPACE = mesh_pb2.NAMESPACE
WORKLOAD = mesh_pb2.WORKLOAD


def pa(
    name: str,
    namespace: str,
    scope: mesh_pb2.PolicyScope.ValueType,
    mode: mesh_pb2.MtlsMode.ValueType,
    selector: Mapping[str, str] | None = None,
    ports: Mapping[int, mesh_pb2.MtlsMode.ValueType] | None = None,
) -> mesh_pb2.PeerAuthentication:
    return mesh_pb2.PeerAuthentication(
        name=name,
        namespace=namespace,
        scope=scope,
        selector=dict(selector or {}),
        mode=mode,
        port_modes=dict(ports or {}),
    )


def state_of(*policies: mesh_pb2.PeerAuthentication) -> MeshState:
    resources = {
        f"peer_authentication/{p.namespace}/{p.name}": mesh_pb2.Resource(
            key=f"peer_authentication/{p.namespace}/{p.name}", peer_authentication=p
        )
        for p in policies
    }
    return MeshState.build("v", resources)


def wl(namespace: str = "demo", **labels: str) -> mesh_pb2.Workload:
    return mesh_pb2.Workload(uid=f"{namespace}-uid", name="w", namespace=namespace, labels=labels)


MESH_STRICT = pa("default", "istio-system", MESH, STRICT)
MESH_PERMISSIVE = pa("default", "istio-system", MESH, PERMISSIVE)
DEMO_PERMISSIVE = pa("default", "demo", NAMESPACE, PERMISSIVE)
DEMO_STRICT = pa("default", "demo", NAMESPACE, STRICT)
DEMO_DISABLE = pa("default", "demo", NAMESPACE, DISABLE)
DEMO_UNSET = pa("default", "demo", NAMESPACE, UNSET)
APP_SERVER_STRICT = pa("server", "demo", WORKLOAD, STRICT, {"app": "server"})
APP_SERVER_DISABLE = pa("server", "demo", WORKLOAD, DISABLE, {"app": "server"})
APP_SERVER_UNSET = pa("server", "demo", WORKLOAD, UNSET, {"app": "server"})

Case = tuple[
    Sequence[mesh_pb2.PeerAuthentication], mesh_pb2.Workload, int, mesh_pb2.MtlsMode.ValueType
]

CASES: dict[str, Case] = {
    "no policy: permissive": ((), wl(), 80, PERMISSIVE),
    "no policy, any namespace: permissive": ((), wl("other", app="server"), 8080, PERMISSIVE),
    "mesh strict applies to demo": ((MESH_STRICT,), wl(), 80, STRICT),
    "mesh strict applies to another namespace": ((MESH_STRICT,), wl("other"), 80, STRICT),
    "mesh strict applies to the root namespace": ((MESH_STRICT,), wl("istio-system"), 80, STRICT),
    "namespace policy only in its namespace": ((DEMO_STRICT,), wl("other"), 80, PERMISSIVE),
    "namespace policy in its namespace": ((DEMO_STRICT,), wl(), 80, STRICT),
    "namespace permissive overrides mesh strict": (
        (MESH_STRICT, DEMO_PERMISSIVE),
        wl(),
        80,
        PERMISSIVE,
    ),
    "namespace strict overrides mesh permissive": (
        (DEMO_STRICT, MESH_PERMISSIVE),
        wl(),
        80,
        STRICT,
    ),
    "namespace override leaves other namespaces on mesh": (
        (MESH_STRICT, DEMO_PERMISSIVE),
        wl("other"),
        80,
        STRICT,
    ),
    "namespace disable": ((MESH_STRICT, DEMO_DISABLE), wl(), 80, DISABLE),
    "workload selector matches: overrides namespace": (
        (MESH_PERMISSIVE, DEMO_PERMISSIVE, APP_SERVER_STRICT),
        wl(app="server", version="v1"),
        80,
        STRICT,
    ),
    "workload selector overrides namespace strict": (
        (DEMO_STRICT, APP_SERVER_DISABLE),
        wl(app="server"),
        80,
        DISABLE,
    ),
    "workload selector does not match other labels": (
        (DEMO_PERMISSIVE, APP_SERVER_STRICT),
        wl(app="client"),
        80,
        PERMISSIVE,
    ),
    "workload selector does not match missing label": (
        (DEMO_PERMISSIVE, APP_SERVER_STRICT),
        wl(),
        80,
        PERMISSIVE,
    ),
    "workload selector needs every label": (
        (pa("s", "demo", WORKLOAD, STRICT, {"app": "server", "tier": "db"}),),
        wl(app="server"),
        80,
        PERMISSIVE,
    ),
    "workload selector with every label": (
        (pa("s", "demo", WORKLOAD, STRICT, {"app": "server", "tier": "db"}),),
        wl(app="server", tier="db", extra="x"),
        80,
        STRICT,
    ),
    "workload selector only in its namespace": (
        (APP_SERVER_STRICT,),
        wl("other", app="server"),
        80,
        PERMISSIVE,
    ),
    "workload selector in another namespace leaves mesh": (
        (MESH_STRICT, pa("s", "other", WORKLOAD, DISABLE, {"app": "server"})),
        wl(app="server"),
        80,
        STRICT,
    ),
    "port mode overrides the policy's mode on that port": (
        (pa("s", "demo", WORKLOAD, STRICT, {"app": "server"}, {8080: PERMISSIVE}),),
        wl(app="server"),
        8080,
        PERMISSIVE,
    ),
    "port mode leaves other ports on the policy's mode": (
        (pa("s", "demo", WORKLOAD, STRICT, {"app": "server"}, {8080: PERMISSIVE}),),
        wl(app="server"),
        80,
        STRICT,
    ),
    "port mode disable under namespace strict": (
        (DEMO_STRICT, pa("s", "demo", WORKLOAD, STRICT, {"app": "server"}, {9000: DISABLE})),
        wl(app="server"),
        9000,
        DISABLE,
    ),
    "port modes of a non-matching workload policy do not apply": (
        (DEMO_STRICT, pa("s", "demo", WORKLOAD, STRICT, {"app": "server"}, {9000: DISABLE})),
        wl(app="client"),
        9000,
        STRICT,
    ),
    "namespace UNSET inherits mesh strict": ((MESH_STRICT, DEMO_UNSET), wl(), 80, STRICT),
    "namespace UNSET without mesh: permissive": ((DEMO_UNSET,), wl(), 80, PERMISSIVE),
    "mesh UNSET: permissive": ((pa("default", "istio-system", MESH, UNSET),), wl(), 80, PERMISSIVE),
    "workload UNSET inherits namespace": (
        (MESH_PERMISSIVE, DEMO_STRICT, APP_SERVER_UNSET),
        wl(app="server"),
        80,
        STRICT,
    ),
    "workload UNSET and namespace UNSET inherit mesh": (
        (MESH_STRICT, DEMO_UNSET, APP_SERVER_UNSET),
        wl(app="server"),
        80,
        STRICT,
    ),
    "workload UNSET, nothing above: permissive": (
        (APP_SERVER_UNSET,),
        wl(app="server"),
        80,
        PERMISSIVE,
    ),
    "workload UNSET with a port mode: the port mode wins on that port": (
        (DEMO_PERMISSIVE, pa("s", "demo", WORKLOAD, UNSET, {"app": "server"}, {8080: STRICT})),
        wl(app="server"),
        8080,
        STRICT,
    ),
    "workload UNSET with a port mode: other ports inherit": (
        (DEMO_DISABLE, pa("s", "demo", WORKLOAD, UNSET, {"app": "server"}, {8080: STRICT})),
        wl(app="server"),
        80,
        DISABLE,
    ),
}


@pytest.mark.parametrize(
    ("policies", "workload", "port", "expected"), list(CASES.values()), ids=list(CASES)
)
def test_mtls_mode(
    policies: Sequence[mesh_pb2.PeerAuthentication],
    workload: mesh_pb2.Workload,
    port: int,
    expected: mesh_pb2.MtlsMode.ValueType,
) -> None:
    state = state_of(*policies)
    got = state.mtls_mode(workload, port)
    assert got == expected, f"got {got}, want {mesh_pb2.MtlsMode.Name(expected)}"
    # The answer does not depend on the order the policies arrived in.
    reversed_state = MeshState(peer_authentications=tuple(reversed(state.peer_authentications)))
    assert reversed_state.mtls_mode(workload, port) == expected


def test_mtls_mode_does_not_change_the_state() -> None:
    state = state_of(MESH_STRICT, DEMO_UNSET, APP_SERVER_UNSET)
    before = state.peer_authentications
    assert state.mtls_mode(wl(app="server"), 80) == STRICT
    assert state.peer_authentications == before
    assert len(before) == 3


def test_port_level_unset_inherits_the_policy_mode() -> None:
    state = state_of(
        DEMO_PERMISSIVE,
        pa("s", "demo", WORKLOAD, STRICT, {"app": "server"}, {8080: UNSET}),
    )
    assert state.mtls_mode(wl(app="server"), 8080) == STRICT


def test_service_for_finds_the_service_routing_the_target_port() -> None:
    pod = mesh_pb2.Workload(uid="u1", name="server", namespace="demo", addresses=["10.0.0.1"])
    other = mesh_pb2.Workload(uid="u2", name="other", namespace="demo", addresses=["10.0.0.2"])
    svc = mesh_pb2.Service(
        name="server",
        namespace="demo",
        hostname="server.demo.svc.cluster.local",
        addresses=["10.96.0.1"],
        ports=[mesh_pb2.ServicePort(port=80, target_port=8080)],
        endpoint_uids=["u1"],
    )
    resources = {
        "workload/demo/server": mesh_pb2.Resource(key="workload/demo/server", workload=pod),
        "workload/demo/other": mesh_pb2.Resource(key="workload/demo/other", workload=other),
        "service/demo/server": mesh_pb2.Resource(key="service/demo/server", service=svc),
    }
    state = MeshState.build("1", resources)
    found = state.service_for(pod, 8080)
    assert found is not None and found.hostname == "server.demo.svc.cluster.local"
    assert state.service_for(pod, 80) is None
    assert state.service_for(other, 8080) is None
