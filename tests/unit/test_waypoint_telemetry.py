"""Request metrics and the access log (waypoint/telemetry.py): Istio's names, label set and
values, Envoy's buckets, and the JSON line."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mesh.api import mesh_pb2
from waypoint.flags import ResponseFlag
from waypoint.telemetry import (
    BUCKETS,
    LABELS,
    RequestMetrics,
    RequestPeers,
    RequestRecord,
    access_log,
    labels,
)

CLIENT = mesh_pb2.Workload(
    name="client-7d9f",
    workload_name="client",
    namespace="demo",
    labels={"app": "client", "version": "v1"},
)
REVIEWS = mesh_pb2.Workload(
    name="reviews-v2-5c4",
    workload_name="reviews-v2",
    namespace="demo",
    labels={
        "app": "reviews",
        "version": "v2",
        "service.istio.io/canonical-name": "reviews-canonical",
        "app.kubernetes.io/version": "2.0",
    },
)
SERVICE = mesh_pb2.Service(
    name="reviews", namespace="demo", hostname="reviews.demo.svc.cluster.local"
)
PEERS = RequestPeers.between(
    CLIENT,
    "spiffe://cluster.local/ns/demo/sa/client",
    REVIEWS,
    "spiffe://cluster.local/ns/demo/sa/reviews",
    SERVICE,
)


def test_peers_from_the_mesh_state() -> None:
    expected = RequestPeers(
        source_workload="client",
        source_workload_namespace="demo",
        source_principal="spiffe://cluster.local/ns/demo/sa/client",
        source_app="client",
        source_version="v1",
        source_canonical_service="client",
        source_canonical_revision="v1",
        destination_workload="reviews-v2",
        destination_workload_namespace="demo",
        destination_principal="spiffe://cluster.local/ns/demo/sa/reviews",
        destination_app="reviews",
        destination_version="v2",
        destination_service="reviews.demo.svc.cluster.local",
        destination_service_name="reviews",
        destination_service_namespace="demo",
        destination_canonical_service="reviews-canonical",
        destination_canonical_revision="2.0",
    )
    assert expected == PEERS


def test_unknown_peers_and_label_fallbacks() -> None:
    bare = mesh_pb2.Workload(name="pod-x", namespace="ns")
    peers = RequestPeers.between(None, None, bare, None, None)
    assert peers.source_workload == peers.source_principal == peers.source_app == "unknown"
    assert peers.destination_workload == "pod-x"  # no owner name: the pod's
    assert peers.destination_canonical_service == "pod-x"
    assert peers.destination_canonical_revision == "latest"
    assert peers.destination_service == "unknown"
    assert peers.connection_security_policy == "mutual_tls"


UF, URX, DC = (
    ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
    ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED,
    ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION,
)
HTTP = {"request_protocol": "http", "grpc_response_status": "", "response_flags": "-"}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (RequestRecord(PEERS, "GET", "r:9080", "/", 200), {**HTTP, "response_code": "200"}),
        (
            RequestRecord(PEERS, "POST", "r:9080", "/p.S/M", 200, grpc=True, grpc_status=14),
            {"request_protocol": "grpc", "response_code": "200", "grpc_response_status": "14"},
        ),
        (
            RequestRecord(PEERS, "GET", "r", "/", 503, flags=[URX, UF]),
            {"response_code": "503", "response_flags": "UF,URX"},
        ),
        (
            RequestRecord(PEERS, "GET", "r", "/", 0, flags=[DC]),
            {"response_code": "0", "response_flags": "DC"},
        ),
        (  # not gRPC: no gRPC status
            RequestRecord(PEERS, "GET", "r", "/", 200, grpc_status=3),
            {"grpc_response_status": ""},
        ),
    ],
)
def test_request_labels(record: RequestRecord, expected: dict[str, str]) -> None:
    values = labels(record)
    assert tuple(values) == LABELS
    assert values["reporter"] == "waypoint"
    assert values["destination_service"] == "reviews.demo.svc.cluster.local"
    assert values["connection_security_policy"] == "mutual_tls"
    assert {k: values[k] for k in expected} == expected


def test_label_set_is_istios() -> None:
    assert len(LABELS) == 25
    assert {"source_app", "destination_canonical_revision", "grpc_response_status"} <= set(LABELS)


def test_metrics_names_buckets_and_values() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    record = RequestRecord(
        PEERS,
        "GET",
        "reviews:9080",
        "/",
        200,
        duration_seconds=0.0123,
        bytes_received=300,
        bytes_sent=4500,
    )
    metrics.record(record)
    metrics.record(record)
    values = labels(record)
    get = registry.get_sample_value
    assert get("istio_requests_total", values) == 2
    assert get("istio_request_duration_milliseconds_sum", values) == pytest.approx(24.6)
    assert get("istio_request_duration_milliseconds_bucket", {**values, "le": "10.0"}) == 0
    assert get("istio_request_duration_milliseconds_bucket", {**values, "le": "25.0"}) == 2
    assert get("istio_request_bytes_bucket", {**values, "le": "250.0"}) == 0
    assert get("istio_request_bytes_bucket", {**values, "le": "500.0"}) == 2
    assert get("istio_response_bytes_sum", values) == 9000
    assert get("istio_response_bytes_bucket", {**values, "le": "5000.0"}) == 2
    text = generate_latest(registry).decode()
    les = {
        line.split('le="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("istio_request_duration_milliseconds_bucket")
    }
    assert "+Inf" in les
    assert {float(le) for le in les - {"+Inf"}} == {float(b) for b in BUCKETS}
    assert BUCKETS[0] == 0.5 and BUCKETS[-1] == 3_600_000


def test_metrics_keep_each_label_set_apart() -> None:
    """Series are looked up once per label set; every field the labels come from tells
    them apart (status, flags, gRPC status, peers)."""
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry)
    base = RequestRecord(PEERS, "GET", "reviews:9080", "/", 200)
    other_peers = RequestPeers.between(CLIENT, None, REVIEWS, None, SERVICE)
    variants = [
        base,
        RequestRecord(PEERS, "GET", "reviews:9080", "/", 503),
        RequestRecord(
            PEERS,
            "GET",
            "reviews:9080",
            "/",
            200,
            flags=[ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED],
        ),
        RequestRecord(PEERS, "POST", "reviews:9080", "/", 200, grpc=True, grpc_status=0),
        RequestRecord(PEERS, "POST", "reviews:9080", "/", 200, grpc=True, grpc_status=14),
        RequestRecord(other_peers, "GET", "reviews:9080", "/", 200),
        RequestRecord(PEERS, "GET", "other:9080", "/x", 200),  # same labels as base
    ]
    for record in variants:
        metrics.record(record)
    get = registry.get_sample_value
    assert get("istio_requests_total", labels(base)) == 2
    for record in variants[1:-1]:
        assert get("istio_requests_total", labels(record)) == 1
    assert len({tuple(labels(r).values()) for r in variants}) == 6


def test_access_log_line() -> None:
    record = RequestRecord(
        PEERS,
        "GET",
        "reviews:9080",
        "/books?id=1",
        503,
        protocol="HTTP/2",
        flags=[ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED],
        upstream="198.19.2.10:9080",
        attempts=3,
        duration_seconds=0.2504,
        bytes_received=10,
        bytes_sent=20,
        start_time=1_700_000_000.25,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        route="VirtualService/demo/reviews#0",
        details="rbac_access_denied_matched_policy[demo/no-admin]",
    )
    line = access_log(record)
    assert "\n" not in line
    assert json.loads(line) == {
        "start_time": "2023-11-14T22:13:20.250Z",
        "method": "GET",
        "authority": "reviews:9080",
        "path": "/books?id=1",
        "protocol": "HTTP/2",
        "response_code": 503,
        "response_flags": "URX",
        "response_code_details": "rbac_access_denied_matched_policy[demo/no-admin]",
        "bytes_received": 10,
        "bytes_sent": 20,
        "duration": 250,
        "upstream_host": "198.19.2.10:9080",
        "upstream_request_attempt_count": 3,
        "route_name": "VirtualService/demo/reviews#0",
        "user_agent": None,
        "request_id": None,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "source_principal": "spiffe://cluster.local/ns/demo/sa/client",
        "destination_principal": "spiffe://cluster.local/ns/demo/sa/reviews",
        "destination_service": "reviews.demo.svc.cluster.local",
    }
