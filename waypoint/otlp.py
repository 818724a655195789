"""Spans for sampled requests, exported over OTLP/gRPC (the OpenTelemetry SDK's exporter
and batch processor) to a collector given by ``--otlp-endpoint``; without an endpoint the
waypoint creates none of this.

The span keeps the ids of the request's :class:`TraceContext` (the ids the waypoint put
in the upstream ``traceparent``), so the trace in the backend links caller, waypoint and
endpoint. Tags follow Envoy's tracer (``http.method``, ``response_flags``, ...), the names
Istio users already search by.
"""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from waypoint.flags import join
from waypoint.telemetry import RequestRecord
from waypoint.tracing import TraceContext

SCOPE = InstrumentationScope("ambimesh.waypoint")


class SpanExporter:
    """``endpoint``: ``host:port`` of an OTLP/gRPC collector (plaintext, as Istio's
    ``opentelemetry`` extension provider dials it inside the cluster)."""

    def __init__(self, endpoint: str, service_name: str = "waypoint") -> None:
        self._resource = Resource.create({"service.name": service_name})
        self._processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))

    def export(self, trace: TraceContext, record: RequestRecord) -> None:
        """Queue the request's span (dropped unless sampled); sent in the background."""
        if not trace.sampled:
            return
        flags = TraceFlags(TraceFlags.SAMPLED)
        parent = None
        if trace.parent_id is not None:
            parent = SpanContext(int(trace.trace_id, 16), int(trace.parent_id, 16), True, flags)
        start = int(record.start_time * 1e9)
        failed = record.status == 0 or record.status >= 500
        span = ReadableSpan(
            name=f"{record.authority}/*",
            context=SpanContext(int(trace.trace_id, 16), int(trace.span_id, 16), False, flags),
            parent=parent,
            resource=self._resource,
            attributes={
                "component": "proxy",
                "http.method": record.method,
                "http.url": f"{record.authority}{record.path}",
                "http.protocol": record.protocol,
                "http.status_code": record.status,
                "response_flags": join(record.flags),
                "upstream_address": record.upstream,
                "upstream_request_attempt_count": record.attempts,
                "request_size": record.bytes_received,
                "response_size": record.bytes_sent,
                "istio.source_principal": record.peers.source_principal,
                "istio.destination_service": record.peers.destination_service,
            },
            kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR if failed else StatusCode.UNSET),
            start_time=start,
            end_time=start + int(record.duration_seconds * 1e9),
            instrumentation_scope=SCOPE,
        )
        self._processor.on_end(span)

    def flush(self, timeout_seconds: float = 30.0) -> bool:
        return self._processor.force_flush(int(timeout_seconds * 1000))

    def shutdown(self) -> None:
        """Send what is queued, then stop the background thread."""
        self._processor.shutdown()  # type: ignore[no-untyped-call]
