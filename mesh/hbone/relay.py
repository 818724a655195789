"""Pump bytes both ways between two duplexes (an HBONE stream, a TCP connection) with half-close."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024


class Duplex(Protocol):
    """What `relay` needs from each side; `HboneStream` and `StreamDuplex` provide it."""

    async def read(self, max_bytes: int) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


class StreamDuplex:
    """A `Duplex` over an asyncio StreamReader/StreamWriter pair (a plain TCP connection)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, max_bytes: int) -> bytes:
        return await self.reader.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if self.writer.can_write_eof() and not self.writer.is_closing():
            self.writer.write_eof()

    def close(self) -> None:
        self.writer.close()

    async def wait_closed(self) -> None:
        await self.writer.wait_closed()


async def _pump(
    source: Duplex, sink: Duplex, counts: list[int], index: int, chunk_size: int
) -> None:
    while True:
        data = await source.read(chunk_size)
        if not data:
            sink.write_eof()
            await sink.drain()
            return
        sink.write(data)
        counts[index] += len(data)
        await sink.drain()


async def relay(
    a: Duplex, b: Duplex, *, chunk_size: int = CHUNK_SIZE, counts: list[int] | None = None
) -> tuple[int, int]:
    """Copy a->b and b->a until both directions reach EOF or either fails; close both.

    EOF on one side becomes a half-close (write_eof) on the other, so request/response
    protocols that shut down their sending side keep working. An error in one direction
    aborts the other. Returns the bytes copied (a->b, b->a), also after an error, so
    callers can account for partial transfers; a caller that may cancel the relay passes
    ``counts`` ([0, 0]) and reads it afterwards, since a cancelled call returns nothing.
    """
    counts = [0, 0] if counts is None else counts
    tasks = [
        asyncio.ensure_future(_pump(a, b, counts, 0, chunk_size)),
        asyncio.ensure_future(_pump(b, a, counts, 1, chunk_size)),
    ]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            failed = [t for t in done if t.exception() is not None]
            if failed:
                log.debug("relay ended by error: %r", failed[0].exception())
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        a.close()
        b.close()
    return counts[0], counts[1]
