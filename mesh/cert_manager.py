"""Certificates for SPIFFE identities (a node's pods, a waypoint's own): fetched from the
controller's CA on first use, cached, and renewed in place, so TLS contexts already handed
to listeners and pools pick up the new certificate for their next handshake.

A controller outage must stay invisible: a renewal that fails keeps the old certificate in
use and is tried again on the schedule of ``mesh.renewal.RenewalPolicy`` (half-life, then
exponential backoff capped by the validity left), and ``retry_now`` cuts the wait short
when the controller is known to be back (ztunnel calls it when its push stream
reconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from mesh import tls
from mesh.renewal import RenewalPolicy
from mesh.spiffe import SpiffeId

log = logging.getLogger(__name__)

Fetch = Callable[[SpiffeId], tls.TlsIdentity]


@dataclass(frozen=True)
class CertStatus:
    """One identity's certificate, as the metrics show it."""

    identity: SpiffeId
    not_after: datetime
    failed_renewals: int  # since the identity was first fetched


@dataclass
class _Entry:
    identity: tls.TlsIdentity
    server: ssl.SSLContext
    client: ssl.SSLContext
    renew_at: float
    failures: int = 0  # in a row, since the last success
    failed_total: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class CertManager:
    """`fetch` is blocking (a gRPC call): it runs in the default executor. Every method
    runs on the event loop's thread."""

    def __init__(self, fetch: Fetch, policy: RenewalPolicy | None = None) -> None:
        self._fetch = fetch
        self._policy = policy or RenewalPolicy()
        self._entries: dict[SpiffeId, _Entry] = {}
        self._inflight: dict[SpiffeId, asyncio.Task[_Entry]] = {}
        self._renewals: dict[SpiffeId, asyncio.Task[None]] = {}

    async def server_context(self, sid: SpiffeId) -> ssl.SSLContext:
        return (await self._entry(sid)).server

    async def client_context(self, sid: SpiffeId) -> ssl.SSLContext:
        return (await self._entry(sid)).client

    def expiries(self) -> list[tuple[SpiffeId, datetime]]:
        return [(sid, entry.identity.not_after) for sid, entry in list(self._entries.items())]

    def status(self) -> list[CertStatus]:
        return [
            CertStatus(sid, e.identity.not_after, e.failed_total)
            for sid, e in list(self._entries.items())
        ]

    def retry_now(self) -> None:
        """The CA is probably reachable again: try every failing renewal at once instead of
        waiting out its backoff."""
        pending = [(sid, e) for sid, e in self._entries.items() if e.failures]
        if pending:
            log.info(
                "controller reachable again: retrying %d pending certificate renewals now",
                len(pending),
            )
        for _, entry in pending:
            entry.renew_at = time.time()
            entry.wake.set()

    def forget(self, sid: SpiffeId) -> None:
        """Stop renewing an identity no local pod uses any more."""
        self._entries.pop(sid, None)
        task = self._renewals.pop(sid, None)
        if task is not None:
            task.cancel()

    async def _entry(self, sid: SpiffeId) -> _Entry:
        entry = self._entries.get(sid)
        if entry is not None:
            return entry
        task = self._inflight.get(sid)
        if task is None:
            # Its own task, so a caller that gives up cancels only its own wait.
            task = asyncio.create_task(self._first_fetch(sid))
            self._inflight[sid] = task
            task.add_done_callback(lambda _: self._inflight.pop(sid, None))
        return await asyncio.shield(task)

    async def _first_fetch(self, sid: SpiffeId) -> _Entry:
        identity = await self._fetch_async(sid)
        entry = _Entry(
            identity,
            tls.server_context(identity),
            tls.client_context(identity),
            self._renew_at(sid, identity),
        )
        self._entries[sid] = entry
        self._renewals[sid] = asyncio.create_task(self._renew_loop(sid, entry))
        return entry

    async def _fetch_async(self, sid: SpiffeId) -> tls.TlsIdentity:
        return await asyncio.get_running_loop().run_in_executor(None, self._fetch, sid)

    def _renew_at(self, sid: SpiffeId, identity: tls.TlsIdentity) -> float:
        now = time.time()
        at = self._policy.renew_at(now, identity.not_after.timestamp())
        log.info(
            "certificate for %s valid until %s; renewing in %.0fs",
            sid,
            identity.not_after.isoformat(),
            at - now,
        )
        return at

    async def _renew_loop(self, sid: SpiffeId, entry: _Entry) -> None:
        while self._entries.get(sid) is entry:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.wake.wait(), max(0.0, entry.renew_at - time.time()))
            entry.wake.clear()  # a retry_now during the fetch below means: once more, now
            try:
                identity = await self._fetch_async(sid)
                tls.server_context(identity)  # a throwaway load: never break the live contexts
            except Exception as exc:  # the one catch-all of this loop: keep the old cert
                self._failed(sid, entry, exc)
                continue
            tls.load_identity(entry.server, identity)
            tls.load_identity(entry.client, identity)
            entry.identity = identity
            if entry.failures:
                log.info("certificate for %s renewed after %d failed tries", sid, entry.failures)
            entry.failures = 0
            entry.renew_at = self._renew_at(sid, identity)

    def _failed(self, sid: SpiffeId, entry: _Entry, exc: Exception) -> None:
        entry.failures += 1
        entry.failed_total += 1
        now = time.time()
        remaining = entry.identity.not_after.timestamp() - now
        delay = self._policy.retry_delay(entry.failures, remaining, random.random())
        entry.renew_at = now + delay
        if remaining > 0:
            log.warning(
                "renewing the certificate for %s failed (try %d), still using the current one "
                "(valid %.0fs more); next try in %.1fs: %s",
                sid,
                entry.failures,
                remaining,
                delay,
                exc,
            )
        else:
            log.error(
                "renewing the certificate for %s failed (try %d) and the current one EXPIRED "
                "%.0fs ago: new connections of this identity fail until it is renewed; next "
                "try in %.1fs: %s",
                sid,
                entry.failures,
                -remaining,
                delay,
                exc,
            )

    def close(self) -> None:
        for task in self._renewals.values():
            task.cancel()
        self._renewals.clear()
