"""deploy/metrics/: every PromQL query of the Grafana dashboard names a metric the
components export and only labels those metrics (or the scrape jobs) have,
docs/metrics.md lists every exported metric, and the Prometheus scrape configuration
parses with the jobs the docs name.

The exported set comes from the real collectors and metric classes registered on fresh
registries (the same ones agent/main.py, ztunnel/main.py, waypoint/main.py and
controller/main.py serve), so a metric renamed in the code fails this test until the
dashboard and the docs follow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.process_collector import ProcessCollector

from agent.metrics import AgentCollector
from agent.node_agent import NodeAgent
from bpf.maps import COUNTERS
from controller.metrics import ControllerCollector, ControllerMetrics
from mesh.cert_manager import CertStatus
from mesh.cert_metrics import CertCollector
from mesh.spiffe import SpiffeId
from waypoint.telemetry import RequestMetrics, RequestPeers, RequestRecord
from ztunnel.metrics import ConnectionLabels, TcpMetrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "metrics" / "grafana-dashboard.json"
PROMETHEUS = ROOT / "deploy" / "metrics" / "prometheus.yml"
DOCS = ROOT / "docs" / "metrics.md"

# What a family of each type is exposed as (prometheus-client, `_created` disabled).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "unknown": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


def _agent_registry() -> CollectorRegistry:
    bpf = SimpleNamespace(
        counters=lambda: dict.fromkeys(COUNTERS, 0), attached_programs=lambda: 0, fast_path=True
    )
    agent = SimpleNamespace(
        enrolled={},
        desired={},
        synced=True,
        link=SimpleNamespace(connected=True),
        errors=0,
        bpf=bpf,
    )
    registry = CollectorRegistry()
    registry.register(AgentCollector(cast(NodeAgent, agent)))
    return registry


def _ztunnel_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    tcp = TcpMetrics(registry)
    tcp.close(tcp.open(ConnectionLabels(reporter="source")), 1, 1)  # one series: its labels
    status = CertStatus(SpiffeId("cluster.local", "demo", "client"), datetime.now(UTC), 0)
    registry.register(CertCollector(SimpleNamespace(status=lambda: [status])))
    return registry


def _waypoint_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    RequestMetrics(registry).record(RequestRecord(RequestPeers(), "GET", "a", "/", 200))
    return registry


def _controller_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(
        ControllerCollector(
            ControllerMetrics(),
            connected_streams=lambda: 0,
            root_not_after=0.0,
            config_serial=lambda: 0,
            config_rejects=lambda: 0,
        )
    )
    return registry


REGISTRIES = {
    "agent": _agent_registry,
    "ztunnel": _ztunnel_registry,
    "waypoint": _waypoint_registry,
    "controller": _controller_registry,
}


def exported(registry: CollectorRegistry) -> dict[str, str]:
    """Each exposed sample name -> its family's name."""
    names: dict[str, str] = {}
    for family in registry.collect():
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
    return names


# Added to every series by the scrape jobs of deploy/metrics/prometheus.yml and Prometheus.
SCRAPE_LABELS = {"job", "instance", "node", "pod", "namespace", "waypoint"}


def sample_labels() -> dict[str, set[str]]:
    """Each exposed sample name -> its label names (one series of each metric exists)."""
    labels: dict[str, set[str]] = {}
    for make in REGISTRIES.values():
        for family in make().collect():
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    expr = _STRINGS.sub('""', expr)
    names = set()
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names.update(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        names.update(n.strip() for n in grouping.split(",") if n.strip())
    return names


def all_exported() -> dict[str, str]:
    names: dict[str, str] = {}
    for make in REGISTRIES.values():
        names.update(exported(make()))
    return names


def _targets(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    for panel in panels:
        yield from _targets(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield str(panel.get("title", "")), str(target["expr"])


# PromQL words that are not metric names: functions, aggregations, keywords.
_NOT_METRICS = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "by", "without", "on",
    "ignoring", "group_left", "group_right", "and", "or", "unless", "histogram_quantile",
    "topk", "bottomk", "clamp_min", "clamp_max", "time", "vector", "label_replace", "offset",
    "delta", "abs", "bool", "le",
}  # fmt: skip
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_LABEL_SETS = re.compile(r"\{[^}]*\}")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_RANGES = re.compile(r"\[[^\]]*\]")
_IDENTIFIERS = re.compile(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside label matchers,
    groupings, ranges and strings that are not functions or keywords."""
    expr = _STRINGS.sub('""', expr)
    expr = _LABEL_SETS.sub("", expr)
    expr = _GROUPINGS.sub("", expr)
    expr = _RANGES.sub("", expr)
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables ($__rate_interval, $node)
    found = set()
    for match in _IDENTIFIERS.finditer(expr):
        word = match.group()
        rest = expr[match.end() :].lstrip()
        if word in _NOT_METRICS or rest.startswith("("):  # a function call
            continue
        if re.fullmatch(r"\d+[smhdwy]?", word) or word in ("e", "inf", "nan"):
            continue
        found.add(word)
    return found


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_metric_names_parser() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, destination_service) ("
        'rate(istio_request_duration_milliseconds_bucket{reporter="waypoint",'
        ' response_code=~"5.."}[$__rate_interval])))'
        " / ignoring(x) ambimesh_enrolled_pods"
    )
    assert metric_names(expr) == {
        "istio_request_duration_milliseconds_bucket",
        "ambimesh_enrolled_pods",
    }


def test_every_dashboard_query_names_an_exported_metric() -> None:
    names = all_exported()
    queries = list(_targets(dashboard()["panels"]))
    assert len(queries) >= 10
    for title, expr in queries:
        selected = metric_names(expr)
        assert selected, f"panel {title!r}: no metric in {expr!r}"
        unknown = selected - names.keys()
        assert not unknown, f"panel {title!r} queries metrics no component exports: {unknown}"


def test_every_dashboard_query_uses_labels_its_metrics_have() -> None:
    labels = sample_labels()
    for title, expr in _targets(dashboard()["panels"]):
        known = SCRAPE_LABELS.union(*(labels[n] for n in metric_names(expr)))
        unknown = label_names(expr) - known
        assert not unknown, f"panel {title!r} uses labels its metrics do not have: {unknown}"


def test_label_names_parser() -> None:
    expr = 'sum by (le, a) (rate(m_bucket{b="x", c=~"y"}[5m])) / ignoring(d) n{e!="}"}'
    assert label_names(expr) == {"le", "a", "b", "c", "d", "e"}


def test_dashboard_covers_every_topic() -> None:
    selected = {n for _, expr in _targets(dashboard()["panels"]) for n in metric_names(expr)}
    families = {all_exported()[n] for n in selected}
    for family in (
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes",
        "ambimesh_enrolled_pods",
        "ambimesh_bpf_programs_attached",
        "ambimesh_agent_errors",
        "ambimesh_certificate_expiry_seconds",
        "istio_requests",
        "istio_request_duration_milliseconds",
        "pilot_xds",
        "pilot_proxy_convergence_time",
        "pilot_total_xds_rejects",
        "citadel_server_csr_count",
        "citadel_server_root_cert_expiry_timestamp",
        "ambimesh_controller_config_rejects",
        "ambimesh_controller_certificates_denied",
    ):
        assert family in families, f"no panel shows {family}"
    assert {f"ambimesh_bpf_{c}" for c in COUNTERS} <= families


def test_a_nonexistent_metric_is_caught() -> None:
    assert metric_names("sum(rate(istio_tcp_connections_openned_total[5m]))") - (
        all_exported().keys()
    ) == {"istio_tcp_connections_openned_total"}


def test_dashboard_uses_the_prometheus_datasource_variable() -> None:
    data = dashboard()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("process", sorted(REGISTRIES))
def test_docs_list_every_exported_metric(process: str) -> None:
    text = DOCS.read_text()
    for name in exported(REGISTRIES[process]()):
        assert f"`{name}`" in text, f"docs/metrics.md does not list {name} ({process})"


def test_docs_list_no_metric_that_is_not_exported() -> None:
    documented = set(re.findall(r"`((?:istio|ambimesh|pilot|citadel)_[a-z_]+)`", DOCS.read_text()))
    names = all_exported()
    stale = {n for n in documented if n not in names and n not in names.values()}
    assert not stale, f"docs/metrics.md lists metrics no component exports: {stale}"


def test_prometheus_config_has_the_jobs() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {
        "ambimesh-agent",
        "ambimesh-ztunnel",
        "ambimesh-waypoint",
        "ambimesh-controller",
    }
    ports = {
        "ambimesh-agent": "agent-metrics",
        "ambimesh-ztunnel": "ztunnel-metrics",
        "ambimesh-controller": "http-monitoring",
    }
    for name, job in jobs.items():
        assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
        relabels = job["relabel_configs"]
        keeps = [r for r in relabels if r.get("action") == "keep"]
        assert keeps, name
        if name in ports:
            assert any(ports[name] in str(r.get("regex")) for r in keeps), name
    waypoint = json.dumps(jobs["ambimesh-waypoint"])
    assert "gateway_networking_k8s_io_gateway_name" in waypoint
    assert "15020" in waypoint
