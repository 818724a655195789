"""A pool of HBONE connections: one mTLS connection per key, multiplexing many tunnels.

Keys are whatever makes connections interchangeable for the caller, typically
(source identity, destination identity, destination address). Concurrent callers for a
key share one connect attempt (and its failure), so a burst of new flows to a peer costs
one handshake.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Generic, TypeVar

from mesh.hbone.connection import (
    HboneClientConnection,
    HboneConnectionClosed,
    HboneStream,
    HboneStreamReset,
)
from mesh.hbone.protocol import Header

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
ConnectFn = Callable[[], Awaitable[HboneClientConnection]]


class HboneConnectionPool(Generic[K]):
    def __init__(self) -> None:
        self._connections: dict[K, HboneClientConnection] = {}
        self._connecting: dict[K, asyncio.Task[HboneClientConnection]] = {}
        # Replaced connections that still carry streams; closed once idle.
        self._retiring: set[HboneClientConnection] = set()

    def __len__(self) -> int:
        return len(self._connections)

    async def get(self, key: K, connect_fn: ConnectFn) -> HboneClientConnection:
        """A usable connection for `key`, connecting with `connect_fn` if there is none."""
        self._sweep()
        conn = self._connections.get(key)
        if conn is not None:
            if conn.is_usable:
                return conn
            self._retire(key, conn)
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(key, connect_fn))
            self._connecting[key] = task
            task.add_done_callback(lambda t: self._connect_done(key, t))
        # One impatient caller must not cancel the handshake the others wait for.
        return await asyncio.shield(task)

    async def open_stream(
        self,
        key: K,
        connect_fn: ConnectFn,
        authority: str,
        extra_headers: Iterable[Header] = (),
    ) -> HboneStream:
        """Open a tunnel on the pooled connection, retrying once on a fresh connection if
        the pooled one turned out to be closing (GOAWAY, peer restart) or refused the stream
        unprocessed (a draining or full peer)."""
        conn = await self.get(key, connect_fn)
        try:
            return await conn.open_stream(authority, extra_headers)
        except (HboneConnectionClosed, HboneStreamReset) as exc:
            if isinstance(exc, HboneStreamReset) and not exc.refused:
                raise
            if self._connections.get(key) is conn:
                self._retire(key, conn)
            conn = await self.get(key, connect_fn)
            return await conn.open_stream(authority, extra_headers)

    def close(self) -> None:
        for task in self._connecting.values():
            task.cancel()
        for conn in [*self._connections.values(), *self._retiring]:
            conn.close()
        self._connections.clear()
        self._retiring.clear()

    async def _connect(self, key: K, connect_fn: ConnectFn) -> HboneClientConnection:
        conn = await connect_fn()
        self._connections[key] = conn
        return conn

    def _connect_done(self, key: K, task: asyncio.Task[HboneClientConnection]) -> None:
        if self._connecting.get(key) is task:
            del self._connecting[key]
        if not task.cancelled() and task.exception() is not None:
            log.debug("HBONE connect for %s failed: %s", key, task.exception())

    def _retire(self, key: K, conn: HboneClientConnection) -> None:
        del self._connections[key]
        if conn.active_streams:
            self._retiring.add(conn)
        else:
            conn.close()

    def _sweep(self) -> None:
        for conn in [c for c in self._retiring if not c.active_streams]:
            self._retiring.discard(conn)
            conn.close()
