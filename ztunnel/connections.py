"""Every proxied connection goes through one table: Istio metrics on open and close, the
access log line, and the live view the admin endpoint shows. Inbound connections admitted
by L4 authorization are re-checked here when policies change, and closed if now denied."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from mesh.hbone.relay import Duplex, relay
from ztunnel.authz import Authorized, Decision
from ztunnel.metrics import DENY, ConnectionLabels, TcpMetrics

log = logging.getLogger("ztunnel.access")


@dataclass(slots=True)
class ConnectionInfo:
    """One proxied connection. Not frozen: `ConnectionTable.relay` swaps ``labels`` for the
    one kept equal instance before the connection is listed (a copy cost ~6 µs)."""

    direction: str  # outbound | inbound | inbound_plaintext
    source: str  # ip:port
    destination: str  # ip:port the client asked for
    labels: ConnectionLabels
    via: str  # hbone | tcp
    hbone: str = "-"  # the CONNECT :authority, when tunnelled
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Bypass:
    """A same-node fast-path connection: ztunnel is both ends, so it also reports as the
    destination, and the kernel carried bytes the relay never saw."""

    destination: ConnectionLabels
    counted: Callable[[], tuple[int, int]]  # (request, response) bytes, asked once at close


class ConnectionTable:
    def __init__(self, metrics: TcpMetrics) -> None:
        self.metrics = metrics
        self._ids = itertools.count(1)
        self._live: dict[int, ConnectionInfo] = {}
        self._authorized: dict[int, tuple[Authorized, Duplex, Duplex]] = {}
        self._revoked: dict[int, Decision] = {}

    async def relay(
        self,
        info: ConnectionInfo,
        downstream: Duplex,
        upstream: Duplex,
        authorized: Authorized | None = None,
        bypass: Bypass | None = None,
    ) -> None:
        """Pump ``downstream`` (the side that opened) <-> ``upstream`` until both are done.

        Istio's byte counters are from the destination's point of view for both reporters:
        received = request bytes (source to destination), sent = response bytes.
        """
        key = next(self._ids)
        # Hold the shared copy of the labels for the connection's life.
        info.labels = self.metrics.open(info.labels)
        self._live[key] = info
        if authorized is not None:
            self._authorized[key] = (authorized, downstream, upstream)
        if bypass is not None:
            self.metrics.open(bypass.destination)
        counts = [0, 0]  # kept up to date by relay(), also if this task is cancelled
        kernel = (0, 0)
        try:
            await relay(downstream, upstream, counts=counts)
        finally:
            request, response = counts
            if bypass is not None:
                kernel = bypass.counted()
                request += kernel[0]
                response += kernel[1]
            del self._live[key]
            self._authorized.pop(key, None)
            revoked = self._revoked.pop(key, None)
            labels = info.labels if revoked is None else replace(info.labels, response_flags=DENY)
            self.metrics.close(labels, sent=response, received=request)
            if bypass is not None:
                closed = bypass.destination
                if revoked is not None:
                    closed = replace(closed, response_flags=DENY)
                self.metrics.close(closed, sent=response, received=request)
            log.info(
                "%s %s %s request_bytes=%d response_bytes=%d%s duration=%.0fms%s%s",
                info.direction,
                "complete" if revoked is None else "closed",
                _describe(info),
                request,
                response,
                "" if bypass is None else f" kernel_bytes={sum(kernel)}",
                (time.time() - info.started) * 1000,
                _audit(authorized.audit if authorized else ()),
                "" if revoked is None else _denial(revoked),
            )

    def deny(self, info: ConnectionInfo, decision: Decision) -> None:
        """Count and log a connection L4 authorization refused, as Istio's ztunnel does: an
        open, and a close with ``response_flags="DENY"``."""
        self.metrics.open(info.labels)
        self.metrics.close(replace(info.labels, response_flags=DENY), sent=0, received=0)
        log.info(
            "%s denied %s%s%s",
            info.direction,
            _describe(info),
            _audit(decision.audit),
            _denial(decision),
        )

    def recheck(self, decide: Callable[[Authorized], Decision]) -> int:
        """Close the admitted connections ``decide`` now denies; how many were closed."""
        closed = 0
        for key, (authorized, downstream, upstream) in list(self._authorized.items()):
            decision = decide(authorized)
            if decision.allowed or key in self._revoked:
                continue
            self._revoked[key] = decision
            downstream.close()
            upstream.close()
            closed += 1
        return closed

    def live(self) -> list[dict[str, object]]:
        """A copy of the open connections, safe to serialize from another thread."""
        return [{"id": key, **asdict(info)} for key, info in list(self._live.items())]

    def __len__(self) -> int:
        return len(self._live)


def _describe(info: ConnectionInfo) -> str:
    labels = info.labels
    return (
        f"src.addr={info.source} "
        f"src.workload={labels.source_workload_namespace}/{labels.source_workload} "
        f"src.identity={labels.source_principal} dst.addr={info.destination} "
        f"dst.workload={labels.destination_workload_namespace}/{labels.destination_workload} "
        f"dst.identity={labels.destination_principal} dst.service={labels.destination_service} "
        f"via={info.via} hbone={info.hbone}"
    )


def _audit(policies: tuple[str, ...]) -> str:
    return f" audit={','.join(policies)}" if policies else ""


def _denial(decision: Decision) -> str:
    """The access-log tail naming what denied: ``policy=ns/name`` or Istio's reason."""
    return f' response_flags={DENY} policy={decision.policy or "-"} reason="{decision.reason}"'
