"""The waypoint benchmark: Envoy as the waypoint is configured for the routes the
ambimesh waypoint gets from the controller, between the same ztunnels; its lab translates
as intended; its table and target verdicts."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambimesh.lab.lab import bundled_config_dir
from ambimesh.lab.topology import plan
from bench import certs, envoy, envoy_waypoint
from bench.envoy import TlsFiles
from bench.envoy_waypoint import ISTIO_RETRIES, ISTIO_RETRY_ON, Route, Upstream
from bench.report import Run, format_table, summarize
from bench.waypoint_lab import (
    ROUTES,
    SERVICES,
    VARIANTS,
    access_routes,
    is_waypoint_command,
    lab_documents,
    virtual_service,
    write_config,
)
from bench.waypoint_report import ROWS, TARGETS, format_targets
from controller.translate import SourcedObject, translate
from mesh.api import mesh_pb2
from mesh.spiffe import SpiffeId

WAYPOINT_ID = "spiffe://cluster.local/ns/wpb/sa/envoy-waypoint"
SERVER_ID = "spiffe://cluster.local/ns/wpb/sa/server"
UPSTREAM = Upstream("198.19.2.12", 8081, SERVER_ID)


def tls(tmp: Path) -> TlsFiles:
    return TlsFiles(tmp / "wp.pem", tmp / "wp.key", tmp / "root-cert.pem")


def waypoint_config(tmp: Path) -> dict[str, Any]:
    return envoy_waypoint.config("198.19.2.11", tls(tmp), ROUTES, UPSTREAM, tmp / "access.log")


def listeners(cfg: dict[str, Any]) -> dict[str, Any]:
    return {lst["name"]: lst for lst in cfg["static_resources"]["listeners"]}


def clusters(cfg: dict[str, Any]) -> dict[str, Any]:
    return {c["name"]: c for c in cfg["static_resources"]["clusters"]}


def typed(listener: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return config


def test_envoy_terminates_hbone_from_any_mesh_identity_on_15008(tmp_path: Path) -> None:
    terminate = listeners(waypoint_config(tmp_path))["connect_terminate"]
    assert terminate["address"]["socket_address"] == {
        "address": "198.19.2.11",
        "port_value": 15008,
    }
    chain = terminate["filter_chains"][0]
    downstream = chain["transport_socket"]["typed_config"]
    assert downstream["require_client_certificate"] is True
    context = downstream["common_tls_context"]
    assert context["alpn_protocols"] == ["h2"]
    assert context["validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
    ]
    (route,) = typed(terminate)["route_config"]["virtual_hosts"][0]["routes"]
    assert route["match"] == {"connect_matcher": {}}
    assert route["route"]["cluster"] == "main_internal"
    internal = clusters(waypoint_config(tmp_path))["main_internal"]
    endpoint = internal["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {
        "envoy_internal_address": {"server_listener_name": "main_internal"}
    }


def test_envoy_routes_in_order_with_istios_default_retries(tmp_path: Path) -> None:
    hcm = typed(listeners(waypoint_config(tmp_path))["main_internal"])
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in routes] == ["canary", "default"]
    assert routes[0]["match"]["headers"] == [
        {"name": "x-bench-route", "string_match": {"exact": "canary"}}
    ]
    assert "headers" not in routes[1]["match"]
    for r in routes:
        assert r["route"]["cluster"] == "backend"
        assert r["route"]["retry_policy"]["retry_on"] == ISTIO_RETRY_ON
        assert r["route"]["retry_policy"]["num_retries"] == ISTIO_RETRIES
        assert "retriable_status_codes" not in r["route"]["retry_policy"]
    assert hcm["access_log"][0]["typed_config"]["path"] == str(tmp_path / "access.log")


def test_envoy_originates_hbone_to_the_endpoint_checking_its_identity(tmp_path: Path) -> None:
    cfg = waypoint_config(tmp_path)
    backend = clusters(cfg)["backend"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert backend["endpoint"]["address"]["envoy_internal_address"] == {
        "server_listener_name": "connect_originate"
    }
    proxy = typed(listeners(cfg)["connect_originate"])
    assert proxy["tunneling_config"] == {"hostname": "198.19.2.12:8081"}
    hbone = clusters(cfg)[proxy["cluster"]]
    address = hbone["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert address["socket_address"] == {"address": "198.19.2.12", "port_value": 15008}
    context = hbone["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": SERVER_ID
    }


def test_real_envoy_accepts_the_waypoint_config(tmp_path: Path) -> None:
    try:
        binary = envoy.envoy_binary()
    except FileNotFoundError:
        pytest.skip("Envoy is not installed (the bench extra)")
    assert certs.issue(tmp_path / "ca", SpiffeId.parse(WAYPOINT_ID), tmp_path, "wp") == tls(
        tmp_path
    )
    path = tmp_path / "wp.yaml"
    path.write_text(yaml.safe_dump(waypoint_config(tmp_path)))
    done = subprocess.run(
        [str(binary), "--mode", "validate", "-c", str(path), "-l", "critical"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def translated() -> dict[str, mesh_pb2.Resource]:
    nodes = list(yaml.safe_load_all((bundled_config_dir() / "nodes.yaml").read_text()))
    lab = plan("amwpbench", {"nodes.yaml": nodes, "wpb.yaml": lab_documents()}, lambda: "u")
    return translate(
        SourcedObject(doc, name) for name, docs in lab.runtime_documents.items() for doc in docs
    )


def test_the_lab_sends_each_service_through_its_own_waypoint() -> None:
    resources = translated()
    assert {
        v: resources[f"service/wpb/{svc}"].service.waypoint for v, (svc, _) in SERVICES.items()
    } == {
        "l4": "",
        "ambimesh": "wpb/waypoint",
        "envoy": "wpb/envoy-waypoint",
    }
    for name in ("waypoint", "envoy-waypoint"):
        waypoint = resources[f"waypoint/wpb/{name}"].waypoint
        assert len(waypoint.addresses) == 1 and waypoint.service_account == name
    assert resources["workload/wpb/client"].workload.ambient
    assert resources["workload/wpb/server"].workload.ambient


def test_the_ambimesh_waypoint_gets_the_same_routes_as_envoy() -> None:
    table = translated()["http_routes/wpb/web"].http_routes
    assert len(table.rules) == len(ROUTES) == 2
    canary, default = table.rules
    assert [(h.name, h.value.exact) for h in canary.matches[0].headers] == [
        ("x-bench-route", "canary")
    ]
    assert not default.matches
    for rule in table.rules:
        assert [b.service for b in rule.backends] == ["web.wpb.svc.cluster.local"]
        # Envoy's routes retry as the controller's default policy does
        assert rule.retry.attempts == ISTIO_RETRIES
        assert sorted(rule.retry.retry_on) == sorted(ISTIO_RETRY_ON.split(","))
        assert not rule.retry.retriable_status_codes


def test_virtual_service_rules_follow_the_routes() -> None:
    vs = virtual_service("web", [Route("a", ("x-k", "v")), Route("b")])
    assert vs["spec"]["hosts"] == ["web"]
    assert vs["spec"]["http"] == [
        {
            "name": "a",
            "route": [{"destination": {"host": "web"}}],
            "match": [{"headers": {"x-k": {"exact": "v"}}}],
        },
        {"name": "b", "route": [{"destination": {"host": "web"}}]},
    ]


def test_config_dir_holds_the_nodes_and_the_bench_objects(tmp_path: Path) -> None:
    write_config(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodes.yaml", "waypoint-bench.yaml"]
    docs = list(yaml.safe_load_all((tmp_path / "waypoint-bench.yaml").read_text()))
    assert docs == lab_documents()


def test_access_routes_reads_both_waypoints_logs() -> None:
    ambimesh = "\n".join(
        [
            "2026-12-02 08:12:50,100 INFO waypoint: waypoint wpb/waypoint up (pid 7)",
            '2026-12-02 08:12:51,154 INFO waypoint.access: {"method":"GET",'
            '"route_name":"VirtualService/wpb/web#1","response_code":200}',
            '2026-12-02 08:12:51,173 INFO waypoint.access: {"route_name":'
            '"VirtualService/wpb/web#1"}',
            '2026-12-02 08:12:51,180 INFO waypoint.access: {"route_name":null}',
            "2026-12-02 08:12:51,190 INFO waypoint.access: {truncated",
        ]
    )
    assert access_routes(ambimesh) == {"VirtualService/wpb/web#1": 2, "": 1}
    envoy = '{"route_name":"default","response_code":200}\n{"route_name":"default"}\n'
    assert access_routes(envoy) == {"default": 2}
    assert access_routes("") == {}


def test_waypoint_process_is_recognised_by_its_command_line() -> None:
    assert is_waypoint_command(["/venv/bin/python", "-m", "waypoint", "--node", "node-2"])
    assert not is_waypoint_command(["sleep", "infinity"])
    assert not is_waypoint_command(["/venv/bin/python", "-m", "ztunnel"])
    assert not is_waypoint_command([])


def runs(mesh_p99: float, envoy_p99: float, mesh_rps: float, envoy_rps: float) -> list[Run]:
    def latency(variant: str, p99: float, cpu: float | None) -> Run:
        values = {"rps": 1000.0, "p50_us": p99 / 4, "p90_us": p99 / 2, "p99_us": p99}
        if cpu is not None:
            values["waypoint_cpu_us_per_request"] = cpu
            values["waypoint_peak_mib"] = 70.0
        return Run(1, "latency", variant, values)

    return [
        Run(1, "rps", "l4", {"rps": 5000.0}),
        Run(1, "rps", "ambimesh", {"rps": mesh_rps, "waypoint_cpu_us_per_request": 800.0}),
        Run(1, "rps", "envoy", {"rps": envoy_rps, "waypoint_cpu_us_per_request": 200.0}),
        latency("l4", 1000.0, None),
        latency("ambimesh", mesh_p99, 900.0),
        latency("envoy", envoy_p99, 300.0),
        Run(0, "idle", "ambimesh", {"waypoint_rss_mib": 66.0}),
        Run(0, "idle", "envoy", {"waypoint_rss_mib": 64.0}),
    ]


def test_table_has_the_baseline_column_and_subtracts_it_on_added_rows() -> None:
    lines = summarize(runs(6000.0, 3000.0, 1000.0, 2500.0), ROWS, VARIANTS)
    by_label = {line.label: line for line in lines}
    p99, added = by_label[ROWS[3].label], by_label[ROWS[5].label]
    assert p99.values == {"l4": 1000.0, "ambimesh": 6000.0, "envoy": 3000.0}
    assert added.values == {"l4": 1000.0, "ambimesh": 5000.0, "envoy": 2000.0}
    assert added.ratio == 2.5
    assert by_label[ROWS[8].label].values == {"l4": None, "ambimesh": 66.0, "envoy": 64.0}
    table = format_table(lines, VARIANTS)
    assert table.splitlines()[0].split() == ["metric", "l4", "ambimesh", "envoy", "ambimesh/envoy"]
    assert "direct" not in table


def test_targets_are_judged_on_the_ratios() -> None:
    assert format_targets(summarize(runs(4500.0, 3000.0, 1250.0, 2500.0), ROWS, VARIANTS)) == (
        "p99 at 1000 req/s: 1.50x Envoy's (target <= 1.5x): met\n"
        "max req/s: 0.50x Envoy's (target >= 0.5x): met"
    )
    missed = format_targets(summarize(runs(6000.0, 3000.0, 1000.0, 2500.0), ROWS, VARIANTS))
    assert missed.splitlines() == [
        "p99 at 1000 req/s: 2.00x Envoy's (target <= 1.5x): MISSED",
        "max req/s: 0.40x Envoy's (target >= 0.5x): MISSED",
    ]
    assert TARGETS[0].verdict([]) == "p99 at 1000 req/s: not measured (target <= 1.5x)"
