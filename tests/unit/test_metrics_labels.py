"""Istio-compatible TCP metrics: ztunnel.context.workload_labels and ztunnel.metrics.TcpMetrics
exposed through a fresh prometheus_client registry."""

from __future__ import annotations

from dataclasses import asdict, fields

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.api import mesh_pb2
from mesh.spiffe import SpiffeId
from ztunnel.context import workload_labels
from ztunnel.metrics import LABELS, ConnectionLabels, TcpMetrics

# DESIGN.md, "Metrics": the label names Istio dashboards query, in this order, plus
# Istio ztunnel's response_flags.
ISTIO_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "connection_security_policy",
    "response_flags",  # Istio ztunnel's: "-", or "DENY" when authorization refused
)
COUNTERS = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
)

CLIENT = mesh_pb2.Workload(
    uid="u-client",
    name="client-7d4f9-abcde",
    namespace="demo",
    service_account="client",
    workload_name="client",
)
SERVER = mesh_pb2.Workload(uid="u-server", name="server", namespace="prod", service_account="srv")
SERVICE = mesh_pb2.Service(
    name="server", namespace="prod", hostname="server.prod.svc.cluster.local"
)
CLIENT_ID = SpiffeId("cluster.local", "demo", "client")
SERVER_ID = SpiffeId("cluster.local", "prod", "srv")


def test_label_names_are_istios() -> None:
    assert LABELS == ISTIO_LABELS
    assert tuple(f.name for f in fields(ConnectionLabels)) == ISTIO_LABELS


def test_workload_labels_everything_known() -> None:
    labels = workload_labels("source", CLIENT, CLIENT_ID, SERVER, SERVER_ID, SERVICE, True)
    assert asdict(labels) == {
        "reporter": "source",
        "source_workload": "client",  # workload_name wins over the pod name
        "source_workload_namespace": "demo",
        "source_principal": "spiffe://cluster.local/ns/demo/sa/client",
        "destination_workload": "server",  # no workload_name: the pod name
        "destination_workload_namespace": "prod",
        "destination_principal": "spiffe://cluster.local/ns/prod/sa/srv",
        "destination_service": "server.prod.svc.cluster.local",
        "connection_security_policy": "mutual_tls",
        "response_flags": "-",
    }


def test_workload_labels_everything_unknown() -> None:
    labels = workload_labels("destination", None, None, None, None, None, False)
    assert labels == ConnectionLabels(reporter="destination")
    assert asdict(labels) == {
        "reporter": "destination",
        "source_workload": "unknown",
        "source_workload_namespace": "unknown",
        "source_principal": "unknown",
        "destination_workload": "unknown",
        "destination_workload_namespace": "unknown",
        "destination_principal": "unknown",
        "destination_service": "unknown",
        "connection_security_policy": "none",
        "response_flags": "-",
    }


@pytest.mark.parametrize(
    ("mtls", "policy"),
    [(True, "mutual_tls"), (False, "none")],
)
def test_workload_labels_security_policy(mtls: bool, policy: str) -> None:
    labels = workload_labels("source", CLIENT, None, None, None, None, mtls)
    assert labels.connection_security_policy == policy
    assert labels.source_principal == "unknown"
    assert labels.destination_workload == "unknown"


def test_workload_labels_principal_independent_of_workload() -> None:
    # A peer authenticated by its certificate but not (yet) in the mesh state.
    labels = workload_labels("destination", None, CLIENT_ID, SERVER, None, None, True)
    assert labels.source_workload == "unknown"
    assert labels.source_workload_namespace == "unknown"
    assert labels.source_principal == CLIENT_ID.uri
    assert labels.destination_workload == "server"
    assert labels.destination_principal == "unknown"
    assert labels.destination_service == "unknown"


# --- TcpMetrics exposition --------------------------------------------------------------


def samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def test_fresh_metrics_expose_no_series(registry: CollectorRegistry) -> None:
    TcpMetrics(registry)
    got = samples(registry)
    assert not any(name in got for name in COUNTERS)
    text = generate_latest(registry).decode()
    for name in COUNTERS:
        assert f"# TYPE {name} counter" in text


def test_open_hands_back_one_shared_instance_per_label_set(registry: CollectorRegistry) -> None:
    metrics = TcpMetrics(registry)
    first = workload_labels("source", CLIENT, CLIENT_ID, SERVER, SERVER_ID, SERVICE, True)
    again = workload_labels("source", CLIENT, CLIENT_ID, SERVER, SERVER_ID, SERVICE, True)
    other = workload_labels("source", CLIENT, CLIENT_ID, SERVER, SERVER_ID, SERVICE, False)
    assert again == first and again is not first
    assert metrics.open(first) is first
    assert metrics.open(again) is first  # a connection holds this one, its own copy is freed
    assert metrics.open(other) is other


def test_open_and_close_expose_istio_series(registry: CollectorRegistry) -> None:
    metrics = TcpMetrics(registry)
    labels = workload_labels("source", CLIENT, CLIENT_ID, SERVER, SERVER_ID, SERVICE, True)
    metrics.open(labels)
    metrics.open(labels)
    metrics.close(labels, sent=100, received=2048)
    metrics.close(labels, sent=5, received=0)

    expected_labels = asdict(labels)
    got = samples(registry)
    want = {
        "istio_tcp_connections_opened_total": 2.0,
        "istio_tcp_connections_closed_total": 2.0,
        "istio_tcp_sent_bytes_total": 105.0,
        "istio_tcp_received_bytes_total": 2048.0,
    }
    for name, value in want.items():
        assert name in got, f"{name} missing from the exposition"
        assert got[name] == [(expected_labels, value)]
        (series_labels, _) = got[name][0]
        assert sorted(series_labels) == sorted(ISTIO_LABELS)
        assert registry.get_sample_value(name, expected_labels) == value


def test_open_without_close(registry: CollectorRegistry) -> None:
    metrics = TcpMetrics(registry)
    labels = ConnectionLabels(reporter="destination")
    metrics.open(labels)
    got = samples(registry)
    assert got["istio_tcp_connections_opened_total"] == [(asdict(labels), 1.0)]
    for name in COUNTERS[1:]:
        assert name not in got


def test_series_are_kept_apart_by_labels(registry: CollectorRegistry) -> None:
    metrics = TcpMetrics(registry)
    mtls = workload_labels("source", CLIENT, CLIENT_ID, SERVER, SERVER_ID, SERVICE, True)
    plain = workload_labels("source", CLIENT, None, None, None, None, False)
    inbound = workload_labels("destination", CLIENT, CLIENT_ID, SERVER, SERVER_ID, SERVICE, True)
    metrics.open(mtls)
    metrics.close(mtls, 10, 20)
    metrics.open(plain)
    metrics.close(plain, 1, 2)
    metrics.open(inbound)

    def value(name: str, labels: ConnectionLabels) -> float | None:
        return registry.get_sample_value(name, asdict(labels))

    assert value("istio_tcp_sent_bytes_total", mtls) == 10
    assert value("istio_tcp_received_bytes_total", mtls) == 20
    assert value("istio_tcp_sent_bytes_total", plain) == 1
    assert value("istio_tcp_received_bytes_total", plain) == 2
    assert value("istio_tcp_connections_opened_total", inbound) == 1
    assert value("istio_tcp_connections_closed_total", inbound) is None
    assert len(samples(registry)["istio_tcp_connections_opened_total"]) == 3


def test_two_registries_are_independent() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    TcpMetrics(first).open(ConnectionLabels(reporter="source"))
    TcpMetrics(second)
    labels = asdict(ConnectionLabels(reporter="source"))
    assert first.get_sample_value("istio_tcp_connections_opened_total", labels) == 1
    assert second.get_sample_value("istio_tcp_connections_opened_total", labels) is None
