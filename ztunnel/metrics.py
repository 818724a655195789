"""Istio's TCP metrics, same names and labels, so existing dashboards work unchanged.

``response_flags`` is Istio ztunnel's: ``-`` normally, ``DENY`` on the close of a
connection authorization refused (its open is counted with ``-``, as in Istio).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

from prometheus_client import CollectorRegistry, Counter

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "connection_security_policy",
    "response_flags",
)
UNKNOWN = "unknown"
NO_FLAGS = "-"
DENY = "DENY"


@dataclass(frozen=True)
class ConnectionLabels:
    reporter: str
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_service: str = UNKNOWN
    connection_security_policy: str = "none"
    response_flags: str = NO_FLAGS


class TcpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened.", LABELS, registry=registry
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed.", LABELS, registry=registry
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes",
            "Bytes the destination sent back (responses).",
            LABELS,
            registry=registry,
        )
        self.received = Counter(
            "istio_tcp_received_bytes",
            "Bytes the destination received (requests).",
            LABELS,
            registry=registry,
        )

    def open(self, labels: ConnectionLabels) -> None:
        self.opened.labels(*astuple(labels)).inc()

    def close(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        values = astuple(labels)
        self.closed.labels(*values).inc()
        self.sent.labels(*values).inc(sent)
        self.received.labels(*values).inc(received)
