"""Every proxied connection goes through one table: Istio metrics on open and close, the
access log line, and the live view the admin endpoint shows."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, field

from mesh.hbone.relay import Duplex, relay
from ztunnel.metrics import ConnectionLabels, TcpMetrics

log = logging.getLogger("ztunnel.access")


@dataclass(frozen=True)
class ConnectionInfo:
    direction: str  # outbound | inbound | inbound_plaintext
    source: str  # ip:port
    destination: str  # ip:port the client asked for
    labels: ConnectionLabels
    via: str  # hbone | tcp
    hbone: str = "-"  # the CONNECT :authority, when tunnelled
    started: float = field(default_factory=time.time)


class ConnectionTable:
    def __init__(self, metrics: TcpMetrics) -> None:
        self.metrics = metrics
        self._ids = itertools.count(1)
        self._live: dict[int, ConnectionInfo] = {}

    async def relay(self, info: ConnectionInfo, downstream: Duplex, upstream: Duplex) -> None:
        """Pump ``downstream`` (the side that opened) <-> ``upstream`` until both are done.

        Istio's byte counters are from the destination's point of view for both reporters:
        received = request bytes (source to destination), sent = response bytes.
        """
        key = next(self._ids)
        self._live[key] = info
        self.metrics.open(info.labels)
        request = response = 0
        try:
            request, response = await relay(downstream, upstream)
        finally:
            del self._live[key]
            self.metrics.close(info.labels, sent=response, received=request)
            labels = info.labels
            log.info(
                "%s complete src.addr=%s src.workload=%s/%s src.identity=%s dst.addr=%s "
                "dst.workload=%s/%s dst.identity=%s dst.service=%s via=%s hbone=%s "
                "request_bytes=%d response_bytes=%d duration=%.0fms",
                info.direction,
                info.source,
                labels.source_workload_namespace,
                labels.source_workload,
                labels.source_principal,
                info.destination,
                labels.destination_workload_namespace,
                labels.destination_workload,
                labels.destination_principal,
                labels.destination_service,
                info.via,
                info.hbone,
                request,
                response,
                (time.time() - info.started) * 1000,
            )

    def live(self) -> list[dict[str, object]]:
        """A copy of the open connections, safe to serialize from another thread."""
        return [{"id": key, **asdict(info)} for key, info in list(self._live.items())]

    def __len__(self) -> int:
        return len(self._live)
