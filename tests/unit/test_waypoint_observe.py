"""The observer's per-request report (waypoint/observe.py): peers are labelled from the
objects the request saw, also when they are built once and reused."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from mesh.api import mesh_pb2
from mesh.spiffe import SpiffeId
from waypoint.context import Downstream, Target
from waypoint.message import BytesBody, Request, Response
from waypoint.observe import CountingBody, Observation, Observer
from waypoint.state import WaypointState
from waypoint.telemetry import RequestMetrics
from waypoint.tracing import TraceContext

SERVICE = mesh_pb2.Service(name="web", namespace="demo", hostname="web.demo.svc.cluster.local")
CLIENT = mesh_pb2.Workload(
    uid="c", name="client", namespace="demo", labels={"app": "client"}, service_account="client"
)


def server(version: str) -> mesh_pb2.Workload:
    return mesh_pb2.Workload(
        uid="s",
        name="server",
        namespace="demo",
        labels={"app": "server", "version": version},
        service_account="server",
    )


def observe(
    observer: Observer, state: WaypointState, source: mesh_pb2.Workload | None = CLIENT
) -> None:
    peer = SpiffeId("cluster.local", "demo", "client")
    downstream = Downstream(peer, "10.0.0.1", source, Target(80, service=SERVICE))
    body = CountingBody(BytesBody())
    request = Request("GET", "http", "web", "/", [], body)
    seen = Observation(downstream, request, TraceContext.from_headers({}), body, service=SERVICE)
    observer.done(seen, state, Response(200, [], upstream_uid="s"), 10, None)


def count(registry: CollectorRegistry, **labels: str) -> float:
    """Requests counted in the series with these labels (and any others)."""
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "istio_requests_total" and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def test_peers_follow_the_state_and_the_source() -> None:
    registry = CollectorRegistry()
    observer = Observer(RequestMetrics(registry))
    v1 = WaypointState(workloads={"s": server("v1")})
    v2 = WaypointState(workloads={"s": server("v2")})
    observe(observer, v1)
    observe(observer, v1)
    observe(observer, v2)  # new configuration: the destination's new labels
    observe(observer, v2, source=None)  # a tunnel whose source is not known
    assert count(registry, destination_version="v1", source_workload="client") == 2
    assert count(registry, destination_version="v2", source_workload="client") == 1
    assert count(registry, destination_version="v2", source_workload="unknown") == 1
    assert count(registry, destination_principal="spiffe://cluster.local/ns/demo/sa/server") == 4
