"""Istio's TCP metrics, same names and labels, so existing dashboards work unchanged.

``response_flags`` is Istio ztunnel's: ``-`` normally, ``DENY`` on the close of a
connection authorization refused (its open is counted with ``-``, as in Istio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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


class _CloseChildren(NamedTuple):
    closed: Counter
    sent: Counter
    received: Counter


class TcpMetrics:
    """The four counters. Each label combination's children are looked up once and kept
    (prometheus-client keeps them for the process's life too): `labels()` and turning the
    label record into values cost more than the increments of a short connection. A
    combination's close series appear with its first close, as before."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # labels -> (the first equal instance seen, its opened child)
        self._opened: dict[ConnectionLabels, tuple[ConnectionLabels, Counter]] = {}
        self._closes: dict[ConnectionLabels, _CloseChildren] = {}
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

    def open(self, labels: ConnectionLabels) -> ConnectionLabels:
        """Count an open. Returns the one kept instance equal to ``labels``, for the caller
        to hold instead: each connection's own copy carries ~0.5 KiB of strings made for it
        (principal URIs, names read out of protobuf), the same for every connection between
        the same pair."""
        entry = self._opened.get(labels)
        if entry is None:
            entry = self._opened[labels] = (labels, self.opened.labels(*_values(labels)))
        entry[1].inc()
        return entry[0]

    def close(self, labels: ConnectionLabels, sent: int, received: int) -> None:
        children = self._closes.get(labels)
        if children is None:
            values = _values(labels)
            children = self._closes[labels] = _CloseChildren(
                self.closed.labels(*values),
                self.sent.labels(*values),
                self.received.labels(*values),
            )
        children.closed.inc()
        children.sent.inc(sent)
        children.received.inc(received)


def _values(labels: ConnectionLabels) -> list[str]:
    return [getattr(labels, name) for name in LABELS]
