"""`ambimesh ztunnel-config` views, cut from admin answers made by ztunnel's own code
(state_dump of a real MeshState, connection records as ConnectionTable.live builds them)."""

from __future__ import annotations

import json
from dataclasses import asdict

import yaml

from ambimesh import output
from ambimesh.ztunnel_config import VIEWS, items, table
from mesh.api import mesh_pb2
from ztunnel.admin import state_dump
from ztunnel.connections import ConnectionInfo
from ztunnel.metrics import ConnectionLabels
from ztunnel.state import MeshState

NOW = 1_800_000_000.0


def resource(key: str, **kind: object) -> mesh_pb2.Resource:
    return mesh_pb2.Resource(key=key, **kind)  # type: ignore[arg-type]


def config_dump() -> dict[str, object]:
    state = MeshState.build(
        "7",
        {
            "w": resource(
                "workload/demo/client",
                workload=mesh_pb2.Workload(
                    uid="u1",
                    name="client",
                    namespace="demo",
                    service_account="client",
                    node="node-1",
                    addresses=["198.19.1.10"],
                    ambient=True,
                ),
            ),
            "s": resource(
                "service/demo/server",
                service=mesh_pb2.Service(
                    name="server",
                    namespace="demo",
                    addresses=["198.18.128.10"],
                    ports=[mesh_pb2.ServicePort(port=80, target_port=8080)],
                    endpoint_uids=["u2", "u3"],
                    waypoint="demo/waypoint",
                ),
            ),
            "p": resource(
                "pa/demo/default",
                peer_authentication=mesh_pb2.PeerAuthentication(
                    name="default",
                    namespace="demo",
                    scope=mesh_pb2.NAMESPACE,
                    mode=mesh_pb2.STRICT,
                    port_modes={9090: mesh_pb2.PERMISSIVE},
                ),
            ),
            "a": resource(
                "ap/demo/deny-legacy",
                authorization_policy=mesh_pb2.AuthorizationPolicy(
                    name="deny-legacy",
                    namespace="demo",
                    scope=mesh_pb2.WORKLOAD,
                    selector={"app": "server"},
                    action=mesh_pb2.AuthorizationPolicy.DENY,
                    rules=[mesh_pb2.AuthorizationRule()],
                ),
            ),
        },
    )
    dump = state_dump(state)
    dump["certificates"] = {
        "spiffe://cluster.local/ns/demo/sa/server": "2027-01-15T08:00:00+00:00",
        "spiffe://cluster.local/ns/demo/sa/client": "2027-01-15T09:00:00+00:00",
    }
    # As it travels: JSON over HTTP.
    parsed = json.loads(json.dumps(dump))
    assert isinstance(parsed, dict)
    return parsed


def live_connection() -> dict[str, object]:
    labels = ConnectionLabels(
        "source",
        source_workload="client",
        source_workload_namespace="demo",
        destination_workload="server",
        destination_workload_namespace="demo",
        connection_security_policy="mutual_tls",
    )
    info = ConnectionInfo(
        "outbound", "198.19.1.10:40000", "198.18.128.10:80", labels, "hbone", started=NOW - 75
    )
    parsed = json.loads(json.dumps({"id": 1, **asdict(info)}))
    assert isinstance(parsed, dict)
    return parsed


def test_workloads_view_shows_address_node_and_account() -> None:
    out = table("workloads", {"node-1": items("workloads", config_dump())}, NOW)
    header, row = out.splitlines()
    assert header.split()[:3] == ["NODE", "NAMESPACE", "NAME"]
    assert row.split() == [
        "node-1",
        "demo",
        "client",
        "198.19.1.10",
        "node-1",
        "client",
        "yes",
        "-",
    ]


def test_services_view_shows_vip_ports_endpoints_waypoint() -> None:
    out = table("services", {"node-1": items("services", config_dump())}, NOW)
    assert out.splitlines()[1].split() == [
        "node-1",
        "demo",
        "server",
        "198.18.128.10",
        "80->8080",
        "2",
        "demo/waypoint",
    ]


def test_policies_view_has_peer_authentications_and_authorization_policies() -> None:
    policies = items("policies", config_dump())
    assert [(p["kind"], p["name"]) for p in policies] == [
        ("PeerAuthentication", "default"),
        ("AuthorizationPolicy", "deny-legacy"),
    ]
    rows = table("policies", {"n": policies}, NOW).splitlines()[1:]
    assert rows[0].split() == [
        "n",
        "AuthorizationPolicy",
        "demo",
        "deny-legacy",
        "WORKLOAD",
        "app=server",
        "DENY",
        "1",
        "rule(s)",
    ]
    assert rows[1].split() == [
        "n",
        "PeerAuthentication",
        "demo",
        "default",
        "NAMESPACE",
        "-",
        "STRICT",
        "9090:PERMISSIVE",
    ]


def test_certs_view_sorted_by_identity_with_time_left() -> None:
    certs = items("certs", config_dump())
    assert [c["identity"] for c in certs] == [
        "spiffe://cluster.local/ns/demo/sa/client",
        "spiffe://cluster.local/ns/demo/sa/server",
    ]
    left = output.duration(output.seconds_until(certs[0]["expires"], NOW) or 0)
    assert table("certs", {"n": certs}, NOW).splitlines()[1].split()[-1] == left


def test_connections_view_shows_both_ends_security_and_age() -> None:
    out = table("connections", {"node-1": items("connections", [live_connection()])}, NOW)
    assert out.splitlines()[1].split() == [
        "node-1",
        "outbound",
        "198.19.1.10:40000",
        "198.18.128.10:80",
        "demo/client",
        "demo/server",
        "mutual_tls",
        "hbone",
        "1m15s",
    ]


def test_json_and_yaml_carry_the_same_items() -> None:
    data = {"node-1": items("workloads", config_dump())}
    as_json = json.loads(output.render(data, "json", lambda: ""))
    as_yaml = yaml.safe_load(output.render(data, "yaml", lambda: ""))
    assert as_json == as_yaml == data


def test_an_answer_without_the_view_is_empty_not_a_crash() -> None:
    for view in VIEWS:
        assert items(view, {"certificates": ["not", "a", "map"]}) == []
        assert items(view, "garbage") == []
        assert table(view, {"n": []}, NOW).startswith("NODE")
