"""The node's certificates when ztunnel runs several workers: one CA request per identity
per renewal period for the whole node, not one per worker.

Each worker keeps its own `CertManager` (its TLS contexts, its renewal schedule) and
fetches through the supervisor, which answers from here. A cached certificate is handed
out until its own renewal point (half its remaining validity when it was obtained); a
worker given it later schedules its renewal later still, so by the time any worker renews,
the cache has gone stale and the CA is asked once, for all of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh.cert_manager import CertStatus, Fetch
from mesh.renewal import RenewalPolicy
from mesh.spiffe import SpiffeId
from mesh.tls import TlsIdentity


@dataclass(frozen=True)
class _Cached:
    identity: TlsIdentity
    fresh_until: float


class NodeCertificates:
    def __init__(
        self,
        fetch: Fetch,
        policy: RenewalPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fetch = fetch
        self._policy = policy or RenewalPolicy()
        self._clock = clock
        self._cached: dict[SpiffeId, _Cached] = {}
        self._failures: dict[SpiffeId, int] = {}
        self._inflight: dict[SpiffeId, asyncio.Task[TlsIdentity]] = {}

    async def identity(self, sid: SpiffeId) -> TlsIdentity:
        """The cached certificate while fresh, else one fetch shared by all who ask now.
        A failed fetch is raised to every asker (their `CertManager` keeps the old one)."""
        cached = self._cached.get(sid)
        if cached is not None and self._clock() < cached.fresh_until:
            return cached.identity
        task = self._inflight.get(sid)
        if task is None:
            task = asyncio.create_task(self._fetch_one(sid))
            self._inflight[sid] = task
            task.add_done_callback(lambda _: self._inflight.pop(sid, None))
        return await asyncio.shield(task)

    async def _fetch_one(self, sid: SpiffeId) -> TlsIdentity:
        try:
            identity = await asyncio.get_running_loop().run_in_executor(None, self._fetch, sid)
        except Exception:
            self._failures[sid] = self._failures.get(sid, 0) + 1
            raise
        now = self._clock()
        self._cached[sid] = _Cached(
            identity, self._policy.renew_at(now, identity.not_after.timestamp())
        )
        return identity

    def forget(self, keep: set[SpiffeId]) -> None:
        """Drop identities no local pod uses any more."""
        for sid in set(self._cached) - keep:
            del self._cached[sid]
            self._failures.pop(sid, None)

    def status(self) -> list[CertStatus]:
        """For `CertCollector`: the newest certificate of each identity; failures are failed
        CA requests (each worker's retry of a failing renewal is one)."""
        return [
            CertStatus(sid, c.identity.not_after, self._failures.get(sid, 0))
            for sid, c in list(self._cached.items())
        ]
