"""relay(): byte counts, half-close propagation, and error handling, with in-memory duplexes."""

from __future__ import annotations

import asyncio

import pytest

from mesh.hbone.relay import relay

TIMEOUT = 5.0


class MemoryDuplex:
    """Reads from a scripted list of chunks (an exception entry is raised); records writes."""

    def __init__(self, incoming: list[bytes | Exception], *, hold_open: bool = False) -> None:
        self.incoming = list(incoming)
        self.hold_open = hold_open
        self.written: list[bytes] = []
        self.eof_written = False
        self.closed = False
        self.released = asyncio.Event()

    async def read(self, max_bytes: int) -> bytes:
        if not self.incoming:
            if self.hold_open:
                await self.released.wait()
            return b""
        item = self.incoming.pop(0)
        if isinstance(item, Exception):
            raise item
        assert len(item) <= max_bytes
        return item

    def write(self, data: bytes) -> None:
        assert not self.eof_written, "write after write_eof"
        self.written.append(data)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True


async def test_copies_both_ways_and_half_closes() -> None:
    a = MemoryDuplex([b"abc", b"de"])
    b = MemoryDuplex([b"xyz" * 10])
    assert await asyncio.wait_for(relay(a, b), TIMEOUT) == (5, 30)
    assert b"".join(b.written) == b"abcde" and b"".join(a.written) == b"xyz" * 10
    assert a.eof_written and b.eof_written
    assert a.closed and b.closed


async def test_eof_one_way_keeps_the_other_way_open() -> None:
    a = MemoryDuplex([b"request"])
    b = MemoryDuplex([b"response"], hold_open=True)
    task = asyncio.ensure_future(relay(a, b))
    await asyncio.sleep(0.05)
    assert b.eof_written  # a's EOF already forwarded as a half-close
    assert not task.done()  # b->a still running
    b.released.set()
    assert await asyncio.wait_for(task, TIMEOUT) == (7, 8)


async def test_error_one_way_ends_both_and_reports_partial_counts() -> None:
    a = MemoryDuplex([b"1234", ConnectionResetError("peer reset")])
    b = MemoryDuplex([], hold_open=True)
    assert await asyncio.wait_for(relay(a, b), TIMEOUT) == (4, 0)
    assert not b.eof_written  # an error is not a clean EOF
    assert a.closed and b.closed


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
async def test_chunk_size_bounds_reads(chunk_size: int) -> None:
    data = [bytes([i]) * min(chunk_size, 3) for i in range(4)]
    a = MemoryDuplex(list(data))
    b = MemoryDuplex([])
    total = sum(len(d) for d in data)
    assert await asyncio.wait_for(relay(a, b, chunk_size=chunk_size), TIMEOUT) == (total, 0)


async def test_a_cancelled_relay_leaves_its_counts_behind() -> None:
    """A released pod cancels its relays; the access log and metrics still need the bytes."""
    a = MemoryDuplex([b"12345"], hold_open=True)
    b = MemoryDuplex([b"678"], hold_open=True)
    counts = [0, 0]
    task = asyncio.ensure_future(relay(a, b, counts=counts))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counts == [5, 3]
    assert a.closed and b.closed
