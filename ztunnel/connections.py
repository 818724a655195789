"""Every proxied connection goes through one table: Istio metrics on open and close, the
access log line, and the live view the admin endpoint shows. Inbound connections admitted
by L4 authorization are re-checked here when policies change, and closed if now denied.

A connection is one `ConnectionInfo` from `ConnectionTable.start` on: the live-table
entry, the relay's byte counts and what a re-check needs. The relay runs in the two
sides' protocol callbacks and the closing accounting in its completion callback, so an
open connection keeps no task or coroutine frame of ours.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mesh.hbone.relay import Duplex, relay
from mesh.log_format import InfoLines
from ztunnel.authz import Authorized, Decision
from ztunnel.metrics import DENY, ConnectionLabels, TcpMetrics

log = logging.getLogger("ztunnel.access")
_access = InfoLines(log)
# The completion callback reads no context variable: no copy of the context per connection.
_EMPTY_CONTEXT = contextvars.Context()


@dataclass(frozen=True)
class Bypass:
    """A same-node fast-path connection: ztunnel is both ends, so it also reports as the
    destination, and the kernel carried bytes the relay never saw."""

    destination: ConnectionLabels
    counted: Callable[[], tuple[int, int]]  # (request, response) bytes, asked once at close


@dataclass(slots=True)
class ConnectionInfo:
    """One proxied connection. Not frozen: `ConnectionTable.start` swaps ``labels`` for
    the one kept equal instance (a copy cost ~6 µs) and fills in the relay's state."""

    direction: str  # outbound | inbound | inbound_plaintext
    source: str  # ip:port
    destination: str  # ip:port the client asked for
    labels: ConnectionLabels
    via: str  # hbone | tcp
    hbone: str = "-"  # the CONNECT :authority, when tunnelled
    started: float = field(default_factory=time.time)
    # Set by ConnectionTable.start: [request, response] bytes so far, kept up to date by
    # the relay; the authorization input and both sides, for re-checks; the fast path's
    # report; the decision that revoked it.
    counts: list[int] = field(default_factory=lambda: [0, 0], init=False, repr=False)
    authorized: Authorized | None = field(default=None, init=False, repr=False)
    downstream: Duplex | None = field(default=None, init=False, repr=False)  # if authorized
    upstream: Duplex | None = field(default=None, init=False, repr=False)  # if authorized
    bypass: Bypass | None = field(default=None, init=False, repr=False)
    revoked: Decision | None = field(default=None, init=False, repr=False)
    table: ConnectionTable | None = field(default=None, init=False, repr=False, compare=False)
    key: int = field(default=0, init=False, repr=False, compare=False)

    def __call__(self, relaying: asyncio.Future[Any] | None) -> None:
        """The relay's done callback (itself: no bound method or partial per connection)."""
        assert self.table is not None
        self.table._closed(self, relaying)


class ConnectionTable:
    def __init__(self, metrics: TcpMetrics) -> None:
        self.metrics = metrics
        self._ids = itertools.count(1)
        self._live: dict[int, ConnectionInfo] = {}

    def start(
        self,
        info: ConnectionInfo,
        downstream: Duplex,
        upstream: Duplex,
        authorized: Authorized | None = None,
        bypass: Bypass | None = None,
    ) -> asyncio.Future[Any]:
        """Pump ``downstream`` (the side that opened) <-> ``upstream`` until both are done,
        then count the close and write the access line. The returned future is done once
        that accounting ran (awaiting it sees it); cancelling it closes both sides.

        Istio's byte counters are from the destination's point of view for both reporters:
        received = request bytes (source to destination), sent = response bytes.
        """
        info.table = self
        info.key = next(self._ids)
        # Hold the shared copy of the labels for the connection's life.
        info.labels = self.metrics.open(info.labels)
        if authorized is not None:
            info.authorized = authorized
            info.downstream = downstream
            info.upstream = upstream
        if bypass is not None:
            info.bypass = bypass
            self.metrics.open(bypass.destination)
        self._live[info.key] = info
        try:
            relaying = asyncio.ensure_future(relay(downstream, upstream, counts=info.counts))
        except BaseException:
            self._closed(info, None)
            raise
        relaying.add_done_callback(info, context=_EMPTY_CONTEXT)
        return relaying

    async def relay(
        self,
        info: ConnectionInfo,
        downstream: Duplex,
        upstream: Duplex,
        authorized: Authorized | None = None,
        bypass: Bypass | None = None,
    ) -> None:
        """`start`, and wait until the connection ended and was accounted for; cancelling
        the waiting task closes it."""
        await self.start(info, downstream, upstream, authorized, bypass)

    def _closed(self, info: ConnectionInfo, relaying: asyncio.Future[Any] | None) -> None:
        """The relay ended (``relaying`` done; None: it failed to start): count, log."""
        del self._live[info.key]
        info.downstream = info.upstream = None  # the table keeps no closed sides alive
        if relaying is not None and not relaying.cancelled():
            exc = relaying.exception()
            if exc is not None:
                log.warning("relay of %s %s failed: %r", info.direction, info.source, exc)
        request, response = info.counts
        bypass = info.bypass
        kernel = (0, 0)
        if bypass is not None:
            kernel = bypass.counted()
            request += kernel[0]
            response += kernel[1]
        revoked = info.revoked
        labels = info.labels if revoked is None else replace(info.labels, response_flags=DENY)
        self.metrics.close(labels, sent=response, received=request)
        if bypass is not None:
            closed = bypass.destination
            if revoked is not None:
                closed = replace(closed, response_flags=DENY)
            self.metrics.close(closed, sent=response, received=request)
        authorized = info.authorized
        audit = _audit(authorized.audit) if authorized is not None else ""
        duration = (time.time() - info.started) * 1000
        _access.info(
            f"{info.direction} {'complete' if revoked is None else 'closed'} {_describe(info)} "
            f"request_bytes={request} response_bytes={response}"
            f"{'' if bypass is None else f' kernel_bytes={sum(kernel)}'} "
            f"duration={duration:.0f}ms{audit}{'' if revoked is None else _denial(revoked)}"
        )

    def deny(self, info: ConnectionInfo, decision: Decision) -> None:
        """Count and log a connection L4 authorization refused, as Istio's ztunnel does: an
        open, and a close with ``response_flags="DENY"``."""
        self.metrics.open(info.labels)
        self.metrics.close(replace(info.labels, response_flags=DENY), sent=0, received=0)
        _access.info(
            f"{info.direction} denied {_describe(info)}{_audit(decision.audit)}{_denial(decision)}"
        )

    def recheck(self, decide: Callable[[Authorized], Decision]) -> int:
        """Close the admitted connections ``decide`` now denies; how many were closed."""
        closed = 0
        for info in list(self._live.values()):
            if info.authorized is None or info.revoked is not None:
                continue
            decision = decide(info.authorized)
            if decision.allowed:
                continue
            info.revoked = decision
            for side in (info.downstream, info.upstream):
                if side is not None:
                    side.close()
            closed += 1
        return closed

    def live(self) -> list[dict[str, object]]:
        """A copy of the open connections, safe to serialize from another thread."""
        return [
            {
                "id": key,
                "direction": info.direction,
                "source": info.source,
                "destination": info.destination,
                "labels": asdict(info.labels),
                "via": info.via,
                "hbone": info.hbone,
                "started": info.started,
            }
            for key, info in list(self._live.items())
        ]

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
