"""HBONE connection pool: one mTLS HTTP/2 connection per (source identity, destination
identity, destination address), multiplexing every tunnel between them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable

from mesh.hbone.connection import HboneClientConnection

Connect = Callable[[], Awaitable[HboneClientConnection]]


class HbonePool:
    def __init__(self) -> None:
        self._conns: dict[Hashable, HboneClientConnection] = {}
        self._locks: dict[Hashable, asyncio.Lock] = {}

    async def get(self, key: Hashable, connect: Connect) -> HboneClientConnection:
        conn = self._conns.get(key)
        if conn is not None and conn.is_usable:
            return conn
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # at most one handshake per key; the others reuse its result
            conn = self._conns.get(key)
            if conn is None or not conn.is_usable:
                if conn is not None:
                    conn.close()
                conn = await connect()
                self._conns[key] = conn
            return conn

    def __len__(self) -> int:
        return sum(1 for c in self._conns.values() if c.is_usable)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
