"""OTLP span export (waypoint/otlp.py) to a real gRPC server on loopback implementing the
collector's TraceService/Export RPC with the opentelemetry-proto messages."""

from __future__ import annotations

import queue
import random
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from waypoint.flags import ResponseFlag
from waypoint.otlp import SpanExporter
from waypoint.telemetry import RequestPeers, RequestRecord
from waypoint.tracing import TraceContext

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Collector:
    """A TraceService that hands every Export request to the test."""

    def __init__(self) -> None:
        self.requests: queue.Queue[ExportTraceServiceRequest] = queue.Queue()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        export = grpc.unary_unary_rpc_method_handler(
            self.export,
            request_deserializer=ExportTraceServiceRequest.FromString,
            response_serializer=ExportTraceServiceResponse.SerializeToString,
        )
        service = "opentelemetry.proto.collector.trace.v1.TraceService"
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"Export": export}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def export(
        self, request: ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ExportTraceServiceResponse:
        self.requests.put(request)
        return ExportTraceServiceResponse()

    def spans(self) -> list[tuple[str, Span]]:
        """(service.name, span) of everything received so far."""
        out: list[tuple[str, Span]] = []
        while not self.requests.empty():
            for resource_spans in self.requests.get().resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    out.extend((attrs["service.name"], span) for span in scope_spans.spans)
        return out


@pytest.fixture
def collector() -> Iterator[Collector]:
    collector = Collector()
    collector.server.start()
    yield collector
    collector.server.stop(grace=None)


def record(status: int = 200) -> RequestRecord:
    peers = RequestPeers(
        source_principal="spiffe://cluster.local/ns/demo/sa/client",
        destination_service="reviews.demo.svc.cluster.local",
    )
    return RequestRecord(
        peers,
        "GET",
        "reviews:9080",
        "/books",
        status,
        flags=[ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED] if status >= 500 else [],
        upstream="198.19.2.10:9080",
        attempts=3,
        duration_seconds=0.25,
        bytes_received=12,
        bytes_sent=34,
        start_time=1_700_000_000.5,
    )


def test_sampled_spans_reach_the_collector_with_the_request_ids(collector: Collector) -> None:
    exporter = SpanExporter(f"127.0.0.1:{collector.port}", service_name="waypoint.demo")
    continued = TraceContext.from_headers({"traceparent": f"00-{TRACE}-{PARENT}-01"})
    started = TraceContext.from_headers({}, random.Random(1), sampling_percent=100.0)
    unsampled = TraceContext.from_headers({"traceparent": f"00-{TRACE}-{PARENT}-00"})
    exporter.export(continued, record(200))
    exporter.export(started, record(503))
    exporter.export(unsampled, record(200))
    try:
        assert exporter.flush(timeout_seconds=10)
    finally:
        exporter.shutdown()

    spans = {span.span_id.hex(): (service, span) for service, span in collector.spans()}
    assert set(spans) == {continued.span_id, started.span_id}

    service, span = spans[continued.span_id]
    assert service == "waypoint.demo"
    assert span.trace_id.hex() == TRACE
    assert span.parent_span_id.hex() == PARENT
    assert span.name == "reviews:9080/*"
    assert span.kind == Span.SPAN_KIND_SERVER
    assert span.start_time_unix_nano == 1_700_000_000_500_000_000
    assert span.end_time_unix_nano - span.start_time_unix_nano == 250_000_000
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["http.method"].string_value == "GET"
    assert attrs["http.url"].string_value == "reviews:9080/books"
    assert attrs["http.status_code"].int_value == 200
    assert attrs["response_flags"].string_value == "-"
    assert attrs["upstream_request_attempt_count"].int_value == 3
    assert span.status.code != span.status.STATUS_CODE_ERROR

    _, root = spans[started.span_id]
    assert root.trace_id.hex() == started.trace_id
    assert root.parent_span_id == b""  # the trace started at the waypoint
    assert root.status.code == root.status.STATUS_CODE_ERROR
    assert {a.key: a.value for a in root.attributes}["response_flags"].string_value == "URX"
