"""Certificates for SPIFFE identities (a node's pods, a waypoint's own): fetched from the
controller's CA on first use, cached, and renewed at half-life in place, so TLS contexts
already handed to listeners and pools pick up the new certificate for their next handshake."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from mesh import tls
from mesh.spiffe import SpiffeId

log = logging.getLogger(__name__)

Fetch = Callable[[SpiffeId], tls.TlsIdentity]
RETRY_SECONDS = 2.0


@dataclass
class _Entry:
    identity: tls.TlsIdentity
    server: ssl.SSLContext
    client: ssl.SSLContext
    renew_at: float


class CertManager:
    """`fetch` is blocking (a gRPC call): it runs in the default executor."""

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._entries: dict[SpiffeId, _Entry] = {}
        self._inflight: dict[SpiffeId, asyncio.Task[_Entry]] = {}
        self._renewals: dict[SpiffeId, asyncio.Task[None]] = {}

    async def server_context(self, sid: SpiffeId) -> ssl.SSLContext:
        return (await self._entry(sid)).server

    async def client_context(self, sid: SpiffeId) -> ssl.SSLContext:
        return (await self._entry(sid)).client

    def expiries(self) -> list[tuple[SpiffeId, datetime]]:
        return [(sid, entry.identity.not_after) for sid, entry in list(self._entries.items())]

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
            _half_life(identity),
        )
        self._entries[sid] = entry
        self._renewals[sid] = asyncio.create_task(self._renew_loop(sid))
        return entry

    async def _fetch_async(self, sid: SpiffeId) -> tls.TlsIdentity:
        identity = await asyncio.get_running_loop().run_in_executor(None, self._fetch, sid)
        log.info("certificate for %s valid until %s", sid, identity.not_after.isoformat())
        return identity

    async def _renew_loop(self, sid: SpiffeId) -> None:
        while sid in self._entries:
            entry = self._entries[sid]
            await asyncio.sleep(max(0.0, entry.renew_at - time.time()))
            try:
                identity = await self._fetch_async(sid)
                tls.server_context(identity)  # a throwaway load: never break the live contexts
            except Exception as exc:  # the one catch-all of this loop: keep the old cert
                log.warning("renewing certificate for %s failed, retrying: %s", sid, exc)
                entry.renew_at = time.time() + RETRY_SECONDS
                continue
            tls.load_identity(entry.server, identity)
            tls.load_identity(entry.client, identity)
            entry.identity = identity
            entry.renew_at = _half_life(identity)

    def close(self) -> None:
        for task in self._renewals.values():
            task.cancel()
        self._renewals.clear()


def _half_life(identity: tls.TlsIdentity) -> float:
    """Renew when half the remaining validity is gone (at most once a second)."""
    remaining = identity.not_after.timestamp() - time.time()
    return time.time() + max(1.0, remaining / 2)
