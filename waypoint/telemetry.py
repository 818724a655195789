"""Istio's HTTP metrics and a JSON access log for every request the waypoint answers, with
the names, labels and buckets an Envoy waypoint reports (istio/proxy ``istio_stats.cc``,
``reporter="waypoint"``), so existing dashboards and log pipelines read ours unchanged.

The request path fills one :class:`RequestRecord` per request (who called whom, what was
asked, what came back, which flags) and hands it to :meth:`RequestMetrics.record` and
:func:`access_log`.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from mesh.api import mesh_pb2
from waypoint.flags import ResponseFlag, join
from waypoint.tracing import TraceContext

__all__ = [
    "LABELS",
    "RequestMetrics",
    "RequestPeers",
    "RequestRecord",
    "TraceContext",
    "access_log",
    "labels",
]

REPORTER = "waypoint"
UNKNOWN = "unknown"
MUTUAL_TLS = "mutual_tls"
# Envoy's default histogram buckets (stats HistogramSettingsImpl::defaultBuckets), which
# Istio uses for the duration (ms) and both size (bytes) histograms.
BUCKETS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)  # fmt: skip
# Istio's label set, in istio_stats.cc order.
LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
    "response_code",
    "grpc_response_status",
)


@dataclass(frozen=True)
class RequestPeers:
    """Both ends of a request as Istio labels them, ``unknown`` where nothing is known.
    A waypoint's caller always arrives over HBONE, hence mutual TLS."""

    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    connection_security_policy: str = MUTUAL_TLS

    @classmethod
    def between(
        cls,
        source: mesh_pb2.Workload | None,
        source_principal: str | None,
        destination: mesh_pb2.Workload | None,
        destination_principal: str | None,
        service: mesh_pb2.Service | None,
    ) -> RequestPeers:
        """From the mesh state: principals are SPIFFE URIs; app, version and canonical
        names come from pod labels the way Istio derives them."""
        src, dst = _workload(source), _workload(destination)
        return cls(
            source_workload=src["workload"],
            source_workload_namespace=src["namespace"],
            source_principal=source_principal or UNKNOWN,
            source_app=src["app"],
            source_version=src["version"],
            source_canonical_service=src["canonical_service"],
            source_canonical_revision=src["canonical_revision"],
            destination_workload=dst["workload"],
            destination_workload_namespace=dst["namespace"],
            destination_principal=destination_principal or UNKNOWN,
            destination_app=dst["app"],
            destination_version=dst["version"],
            destination_service=service.hostname if service else UNKNOWN,
            destination_service_name=service.name if service else UNKNOWN,
            destination_service_namespace=service.namespace if service else UNKNOWN,
            destination_canonical_service=dst["canonical_service"],
            destination_canonical_revision=dst["canonical_revision"],
        )


def _workload(workload: mesh_pb2.Workload | None) -> dict[str, str]:
    """Istio's canonical service: service.istio.io/canonical-name, app.kubernetes.io/name,
    app, else the workload name; its revision: canonical-revision, app.kubernetes.io/
    version, version, else "latest"."""
    if workload is None:
        return dict.fromkeys(
            ("workload", "namespace", "app", "version", "canonical_service", "canonical_revision"),
            UNKNOWN,
        )
    name = workload.workload_name or workload.name
    labels = workload.labels
    return {
        "workload": name,
        "namespace": workload.namespace,
        "app": labels.get("app", UNKNOWN),
        "version": labels.get("version", UNKNOWN),
        "canonical_service": _first(
            labels, "service.istio.io/canonical-name", "app.kubernetes.io/name", "app"
        )
        or name,
        "canonical_revision": _first(
            labels, "service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"
        )
        or "latest",
    }


def _first(labels: Mapping[str, str], *keys: str) -> str | None:
    return next((labels[k] for k in keys if labels.get(k)), None)


@dataclass(frozen=True)
class RequestRecord:
    peers: RequestPeers
    method: str
    authority: str
    path: str
    status: int  # the status sent downstream; 0: none (the caller went away first)
    protocol: str = "HTTP/1.1"  # downstream: "HTTP/1.1", "HTTP/1.0" or "HTTP/2"
    grpc: bool = False
    grpc_status: int | None = None
    flags: Sequence[ResponseFlag] = ()
    upstream: str = ""  # "ip:port" of the endpoint of the last attempt
    attempts: int = 0  # upstream attempts (Envoy's UPSTREAM_REQUEST_ATTEMPT_COUNT)
    duration_seconds: float = 0.0
    bytes_received: int = 0  # from downstream (request, on the wire)
    bytes_sent: int = 0  # to downstream (response, on the wire)
    start_time: float = field(default_factory=time.time)  # epoch seconds
    trace_id: str = ""
    route: str = ""  # the route rule's name
    details: str = ""  # Envoy's response code details, e.g. which policy denied
    user_agent: str = ""
    request_id: str = ""  # x-request-id


def labels(record: RequestRecord) -> dict[str, str]:
    """Istio's labels of one request: ``request_protocol`` grpc or http, ``response_code``
    0 when nothing was sent, ``grpc_response_status`` empty unless gRPC."""
    values = {"reporter": REPORTER, **asdict(record.peers)}
    values["request_protocol"] = "grpc" if record.grpc else "http"
    values["response_flags"] = join(record.flags)
    values["response_code"] = str(record.status)
    grpc_status = record.grpc_status if record.grpc else None
    values["grpc_response_status"] = "" if grpc_status is None else str(grpc_status)
    return {name: values[name] for name in LABELS}


_Children = tuple[Counter, Histogram, Histogram, Histogram]


class RequestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("istio_requests", "Requests handled.", LABELS, registry=registry)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds.",
            LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Request sizes (bytes received from downstream).",
            LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response sizes (bytes sent downstream).",
            LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self._by_labels: dict[Hashable, _Children] = {}

    def record(self, record: RequestRecord) -> None:
        requests, duration, request_bytes, response_bytes = self._children(record)
        requests.inc()
        duration.observe(record.duration_seconds * 1000.0)
        request_bytes.observe(record.bytes_received)
        response_bytes.observe(record.bytes_sent)

    def _children(self, record: RequestRecord) -> _Children:
        """The four series of the record's label set, found once per label set: building
        the labels (``asdict`` of the peers) and four ``labels()`` lookups cost ~8 % of a
        request's CPU. Holds no more entries than the metrics themselves hold series."""
        grpc_status = record.grpc_status if record.grpc else None
        key = (record.peers, record.grpc, tuple(record.flags), record.status, grpc_status)
        children = self._by_labels.get(key)
        if children is None:
            values = tuple(labels(record).values())
            children = self._by_labels[key] = (
                self.requests.labels(*values),
                self.duration.labels(*values),
                self.request_bytes.labels(*values),
                self.response_bytes.labels(*values),
            )
        return children


def access_log(record: RequestRecord) -> str:
    """One JSON line with the keys of Istio's JSON access log format where it has them
    (``duration`` in ms, ``upstream_host``, ``response_flags``), plus the attempts, the
    trace id and both principals."""
    peers = record.peers
    return json.dumps(
        {
            "start_time": _timestamp(record.start_time),
            "method": record.method,
            "authority": record.authority,
            "path": record.path,
            "protocol": record.protocol,
            "response_code": record.status,
            "response_flags": join(record.flags),
            "response_code_details": record.details or None,
            "bytes_received": record.bytes_received,
            "bytes_sent": record.bytes_sent,
            "duration": round(record.duration_seconds * 1000.0),
            "upstream_host": record.upstream or None,
            "upstream_request_attempt_count": record.attempts,
            "route_name": record.route or None,
            "user_agent": record.user_agent or None,
            "request_id": record.request_id or None,
            "trace_id": record.trace_id or None,
            "source_principal": peers.source_principal,
            "destination_principal": peers.destination_principal,
            "destination_service": peers.destination_service,
        },
        separators=(",", ":"),
    )


def _timestamp(epoch: float) -> str:
    """Envoy's %START_TIME%: UTC with milliseconds."""
    seconds = int(epoch)
    millis = int((epoch - seconds) * 1000)
    return f"{_utc_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(seconds: int) -> str:
    """The formatted second, once per second rather than once per request (2 % of one)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
