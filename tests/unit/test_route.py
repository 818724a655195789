"""ztunnel.route.decide_outbound over a MeshState built from mesh_pb2 Resources: the
whole outbound decision as a table, without sockets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from mesh.api import mesh_pb2
from mesh.spiffe import SpiffeId
from ztunnel.route import NoHealthyEndpoint, Protocol, decide_outbound
from ztunnel.sockets import HBONE_PORT
from ztunnel.state import MeshState


def workload(
    uid: str,
    *addresses: str,
    ambient: bool = True,
    namespace: str = "demo",
    sa: str = "",
    trust_domain: str = "",
) -> mesh_pb2.Resource:
    return mesh_pb2.Resource(
        key=f"workload/{namespace}/{uid}",
        workload=mesh_pb2.Workload(
            uid=uid,
            name=uid,
            namespace=namespace,
            service_account=sa,
            addresses=list(addresses),
            ambient=ambient,
            trust_domain=trust_domain,
        ),
    )


def service(
    name: str,
    vip: str,
    ports: Sequence[tuple[int, int]],
    endpoints: Sequence[str],
    namespace: str = "demo",
) -> mesh_pb2.Resource:
    return mesh_pb2.Resource(
        key=f"service/{namespace}/{name}",
        service=mesh_pb2.Service(
            name=name,
            namespace=namespace,
            hostname=f"{name}.{namespace}.svc.cluster.local",
            addresses=[vip],
            ports=[mesh_pb2.ServicePort(port=p, target_port=t) for p, t in ports],
            endpoint_uids=list(endpoints),
        ),
    )


RESOURCES = [
    workload("server-1", "10.1.0.10", sa="server"),
    workload("server-2", "10.1.0.11", sa="server", trust_domain="example.org"),
    workload("plain-1", "10.2.0.10", ambient=False, namespace="legacy", sa="plain"),
    workload("client", "10.1.0.20"),  # no service account: "default"
    workload("gone", ambient=True),  # an endpoint without an address
    service("server", "10.96.0.10", [(80, 8080), (9090, 0)], ["server-1", "server-2"]),
    service("plain", "10.96.0.20", [(80, 8081)], ["plain-1"], namespace="legacy"),
    service("empty", "10.96.0.30", [(80, 8080)], []),
    service("stale", "10.96.0.40", [(80, 8080)], ["no-such-uid", "gone"]),
]


@pytest.fixture
def state() -> MeshState:
    return MeshState.build("v1", {r.key: r for r in RESOURCES})


@dataclass(frozen=True)
class Case:
    dst: tuple[str, int]
    protocol: Protocol
    address: tuple[str, int]
    authority: str
    destination_uid: str | None
    identity: str | None
    service: str | None


CASES = {
    "vip to ambient endpoint: HBONE to its 15008, authority target port": Case(
        ("10.96.0.10", 80),
        Protocol.HBONE,
        ("10.1.0.10", HBONE_PORT),
        "10.1.0.10:8080",
        "server-1",
        "spiffe://cluster.local/ns/demo/sa/server",
        "server.demo.svc.cluster.local",
    ),
    "vip port without targetPort uses the port": Case(
        ("10.96.0.10", 9090),
        Protocol.HBONE,
        ("10.1.0.10", HBONE_PORT),
        "10.1.0.10:9090",
        "server-1",
        "spiffe://cluster.local/ns/demo/sa/server",
        "server.demo.svc.cluster.local",
    ),
    "vip to non-ambient endpoint: plain TCP to endpoint:targetPort": Case(
        ("10.96.0.20", 80),
        Protocol.TCP,
        ("10.2.0.10", 8081),
        "10.2.0.10:8081",
        "plain-1",
        None,
        "plain.legacy.svc.cluster.local",
    ),
    "ambient pod ip: HBONE to ip:15008, authority ip:port": Case(
        ("10.1.0.11", 8080),
        Protocol.HBONE,
        ("10.1.0.11", HBONE_PORT),
        "10.1.0.11:8080",
        "server-2",
        "spiffe://example.org/ns/demo/sa/server",
        None,
    ),
    "ambient pod without service account: identity sa/default": Case(
        ("10.1.0.20", 7000),
        Protocol.HBONE,
        ("10.1.0.20", HBONE_PORT),
        "10.1.0.20:7000",
        "client",
        "spiffe://cluster.local/ns/demo/sa/default",
        None,
    ),
    "non-ambient pod ip: plain TCP to the original destination": Case(
        ("10.2.0.10", 8081),
        Protocol.TCP,
        ("10.2.0.10", 8081),
        "10.2.0.10:8081",
        "plain-1",
        None,
        None,
    ),
    "unknown ip: TCP passthrough to the original destination": Case(
        ("93.184.216.34", 443),
        Protocol.TCP,
        ("93.184.216.34", 443),
        "93.184.216.34:443",
        None,
        None,
        None,
    ),
    "port 15008 of an unknown ip is not special": Case(
        ("192.0.2.1", HBONE_PORT),
        Protocol.TCP,
        ("192.0.2.1", HBONE_PORT),
        f"192.0.2.1:{HBONE_PORT}",
        None,
        None,
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_decide_outbound(state: MeshState, case: Case) -> None:
    decision = decide_outbound(state, *case.dst)
    assert decision.protocol is case.protocol
    assert decision.address == case.address
    assert decision.authority == case.authority
    if case.destination_uid is None:
        assert decision.destination is None
    else:
        assert decision.destination is not None
        assert decision.destination.uid == case.destination_uid
    if case.identity is None:
        assert decision.expected_identity is None
    else:
        assert decision.expected_identity == SpiffeId.parse(case.identity)
    if case.service is None:
        assert decision.service is None
    else:
        assert decision.service is not None
        assert decision.service.hostname == case.service


@pytest.mark.parametrize(
    ("dst", "message"),
    [
        (("10.96.0.10", 81), "service server.demo.svc.cluster.local has no port 81"),
        (("10.96.0.10", 8080), "has no port 8080"),  # the target port is not a service port
        (("10.96.0.30", 80), "service empty.demo.svc.cluster.local has no endpoints"),
        (("10.96.0.40", 80), "service stale.demo.svc.cluster.local has no endpoints"),
    ],
)
def test_no_healthy_endpoint(state: MeshState, dst: tuple[str, int], message: str) -> None:
    with pytest.raises(NoHealthyEndpoint, match=message):
        decide_outbound(state, *dst)


def test_no_healthy_endpoint_is_a_lookup_error() -> None:
    assert issubclass(NoHealthyEndpoint, LookupError)


def test_pick_chooses_among_the_endpoints_with_addresses(state: MeshState) -> None:
    seen: list[list[str]] = []

    def last(endpoints: Sequence[mesh_pb2.Workload]) -> mesh_pb2.Workload:
        seen.append([w.uid for w in endpoints])
        return endpoints[-1]

    decision = decide_outbound(state, "10.96.0.10", 80, pick=last)
    assert seen == [["server-1", "server-2"]]
    assert decision.protocol is Protocol.HBONE
    assert decision.address == ("10.1.0.11", HBONE_PORT)
    assert decision.authority == "10.1.0.11:8080"
    assert decision.expected_identity == SpiffeId("example.org", "demo", "server")


def test_pick_skips_endpoints_without_address_or_workload() -> None:
    resources = [
        workload("gone"),
        workload("live", "10.1.0.30", sa="live"),
        service("mixed", "10.96.0.50", [(80, 8080)], ["missing", "gone", "live"]),
    ]
    state = MeshState.build("v", {r.key: r for r in resources})
    seen: list[list[str]] = []

    def first(endpoints: Sequence[mesh_pb2.Workload]) -> mesh_pb2.Workload:
        seen.append([w.uid for w in endpoints])
        return endpoints[0]

    decision = decide_outbound(state, "10.96.0.50", 80, pick=first)
    assert seen == [["live"]]
    assert decision.address == ("10.1.0.30", HBONE_PORT)
    assert decision.authority == "10.1.0.30:8080"


def test_pick_is_not_called_for_pod_or_unknown_destinations(state: MeshState) -> None:
    def never(endpoints: Sequence[mesh_pb2.Workload]) -> mesh_pb2.Workload:
        raise AssertionError("pick called")

    assert decide_outbound(state, "10.1.0.10", 8080, pick=never).protocol is Protocol.HBONE
    assert decide_outbound(state, "203.0.113.9", 80, pick=never).protocol is Protocol.TCP


def test_empty_state_passes_everything_through() -> None:
    decision = decide_outbound(MeshState(), "10.96.0.10", 80)
    assert (decision.protocol, decision.address) == (Protocol.TCP, ("10.96.0.10", 80))
    assert decision.destination is None and decision.service is None


def test_build_indexes_every_address_and_vip() -> None:
    multi = workload("multi", "10.1.0.40", "fd00::40", sa="m")
    svc = service("two-vips", "10.96.0.60", [(80, 8080)], ["multi"])
    svc.service.addresses.append("fd00::60")
    state = MeshState.build("v7", {multi.key: multi, svc.key: svc})
    assert state.version == "v7"
    assert set(state.workloads) == {"multi"}
    assert set(state.by_address) == {"10.1.0.40", "fd00::40"}
    assert set(state.services_by_vip) == {"10.96.0.60", "fd00::60"}
    for vip in ("10.96.0.60", "fd00::60"):
        decision = decide_outbound(state, vip, 80)
        assert decision.address == ("10.1.0.40", HBONE_PORT)  # the endpoint's first address
        assert decision.authority == "10.1.0.40:8080"


def waypoint(
    name: str, *addresses: str, traffic: str = "", namespace: str = "demo"
) -> mesh_pb2.Resource:
    return mesh_pb2.Resource(
        key=f"waypoint/{namespace}/{name}",
        waypoint=mesh_pb2.Waypoint(
            name=name,
            namespace=namespace,
            addresses=list(addresses),
            service_account=name,
            hbone_port=15008,
            traffic_type=traffic,
        ),
    )


def waypoint_state(traffic: str = "", instances: tuple[str, ...] = ("10.1.0.90",)) -> MeshState:
    wp_pod = workload("wp-pod", "10.1.0.90", ambient=False, sa="wp")
    svc = service("reviews", "10.96.0.70", [(80, 9080)], ["server-1"])
    svc.service.waypoint = "demo/wp"
    pod = workload("pod-wp", "10.1.0.95", sa="pod")
    pod.workload.waypoint = "demo/wp"
    resources = [*RESOURCES, wp_pod, svc, pod, waypoint("wp", *instances, traffic=traffic)]
    return MeshState.build("v", {r.key: r for r in resources})


@pytest.mark.parametrize("traffic", ["", "service", "all"])
def test_service_with_a_waypoint_goes_to_the_waypoint_keeping_the_vip(traffic: str) -> None:
    decision = decide_outbound(waypoint_state(traffic), "10.96.0.70", 80)
    assert decision.protocol is Protocol.HBONE
    assert decision.address == ("10.1.0.90", 15008)
    assert decision.authority == "10.96.0.70:80"
    assert decision.expected_identity == SpiffeId("cluster.local", "demo", "wp")
    assert decision.service is not None and decision.service.name == "reviews"
    assert decision.waypoint is not None and decision.waypoint.name == "wp"
    assert decision.destination is not None and decision.destination.uid == "wp-pod"


@pytest.mark.parametrize(
    ("traffic", "instances"),
    [("workload", ("10.1.0.90",)), ("none", ("10.1.0.90",)), ("service", ("10.9.9.9",))],
    ids=["waypoint for workloads only", "waypoint for nothing", "no running instance"],
)
def test_service_goes_direct_when_its_waypoint_does_not_take_it(
    traffic: str, instances: tuple[str, ...]
) -> None:
    decision = decide_outbound(waypoint_state(traffic, instances), "10.96.0.70", 80)
    assert (decision.address, decision.authority) == (("10.1.0.10", HBONE_PORT), "10.1.0.10:9080")
    assert decision.waypoint is None


@pytest.mark.parametrize(
    ("traffic", "via"), [("workload", True), ("all", True), ("service", False)]
)
def test_pod_ip_goes_through_a_waypoint_for_workloads(traffic: str, via: bool) -> None:
    decision = decide_outbound(waypoint_state(traffic), "10.1.0.95", 8080)
    assert decision.authority == "10.1.0.95:8080"
    expected = ("10.1.0.90", 15008) if via else ("10.1.0.95", HBONE_PORT)
    assert decision.address == expected
    assert (decision.waypoint is not None) is via
