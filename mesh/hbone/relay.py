"""Pump bytes both ways between two duplexes (an HBONE stream, a TCP connection) with half-close."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeGuard

log = logging.getLogger(__name__)

CHUNK_SIZE = 64 * 1024
_EMPTY_CONTEXT = contextvars.Context()


class Duplex(Protocol):
    """What `relay` needs from each side; `HboneStream`, `TcpDuplex` and `StreamDuplex`
    provide it."""

    async def read(self, max_bytes: int) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...


class PushDuplex(Duplex, Protocol):
    """A duplex that can hand what it receives straight to a sink from its protocol
    callbacks (`HboneStream`, `TcpDuplex`), so relaying a chunk wakes no task."""

    def start_push(self, push: Push) -> None:
        """From now on deliver received bytes, EOF and errors to ``push`` (buffered ones first)."""

    def stop_push(self) -> None: ...

    @property
    def write_blocked(self) -> bool:
        """Whether written bytes above its buffer limit wait (`drain()` would wait)."""

    def when_unblocked(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when written bytes were taken or the duplex failed."""

    def eof_sent(self) -> bool:
        """Whether a `write_eof()` went out (for HBONE: END_STREAM handed to the connection);
        raises the duplex's error if it failed."""


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


class Push:
    """One direction of a push relay: the source calls `feed` for each chunk it received,
    in order, then `end` at EOF or `fail`; the sink's buffer limit pushes back on the source."""

    # One per direction of every open connection: slots, not a dict (~200 bytes less).
    __slots__ = ("_counts", "_index", "_relay", "sink")

    def __init__(self, sink: PushDuplex, counts: list[int], index: int, relay: _PushRelay) -> None:
        self.sink = sink
        self._counts = counts
        self._index = index
        self._relay = relay

    def _finished(self, error: BaseException | None) -> None:
        self._relay.direction_done(self._index, error)

    def feed(self, data: bytes) -> bool:
        """Write ``data`` to the sink; False when the sink is full: the source then holds
        what it receives (and stops reading) until `sink.when_unblocked` calls it back."""
        self.sink.write(data)
        self._counts[self._index] += len(data)
        return not self.sink.write_blocked

    def end(self) -> None:
        """The source reached EOF after its last `feed`: half-close the sink."""
        try:
            self.sink.write_eof()
        except Exception as exc:
            self._finished(exc)
            return
        self._check_eof()

    def fail(self, error: BaseException) -> None:
        self._finished(error)

    def _check_eof(self) -> None:
        try:
            sent = self.sink.eof_sent()
        except Exception as exc:
            self._finished(exc)
            return
        if sent:
            self._finished(None)
        else:
            self.sink.when_unblocked(self._check_eof)


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


def relay(
    a: Duplex, b: Duplex, *, chunk_size: int = CHUNK_SIZE, counts: list[int] | None = None
) -> Awaitable[tuple[int, int]]:
    """Copy a->b and b->a until both directions reach EOF or either fails; close both.

    EOF on one side becomes a half-close (write_eof) on the other, so request/response
    protocols that shut down their sending side keep working. An error in one direction
    aborts the other. Returns the bytes copied (a->b, b->a), also after an error, so
    callers can account for partial transfers; a caller that may cancel the relay passes
    ``counts`` ([0, 0]) and reads it afterwards, since a cancelled call returns nothing.

    Two `PushDuplex` sides are joined in their protocol callbacks (no task per direction,
    no task wake-up per chunk) from this call on, and what is handed back is a future that
    the last callback completes: an open connection holds no coroutine frame, closure or
    task for its relay (~1 KiB less than a coroutine awaiting the callbacks). Any other
    pair is pumped by two tasks, in the coroutine handed back.
    """
    counts = [0, 0] if counts is None else counts
    if _pushable(a) and _pushable(b):
        return _PushRelay(a, b, counts).done
    return _task_relay(a, b, counts, chunk_size)


def _pushable(duplex: Duplex) -> TypeGuard[PushDuplex]:
    return hasattr(duplex, "start_push")


class _PushRelay:
    """Both directions of a push relay. ``done`` completes with the counts once both
    directions reached EOF or either failed (errors end the relay, they are not raised);
    however it completes, cancelled by the awaiting task too, both sides stop and close."""

    __slots__ = ("_a", "_b", "_counts", "_finished", "done")

    def __init__(self, a: PushDuplex, b: PushDuplex, counts: list[int]) -> None:
        self._a = a
        self._b = b
        self._counts = counts
        self._finished = 0  # directions at EOF
        self.done: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        # No copy of the current context per relay (~100 bytes): _ended reads no context var.
        self.done.add_done_callback(self._ended, context=_EMPTY_CONTEXT)
        a.start_push(Push(b, counts, 0, self))
        b.start_push(Push(a, counts, 1, self))

    def direction_done(self, index: int, error: BaseException | None) -> None:
        if self.done.done():
            return
        if error is not None:
            log.debug("relay ended by error: %r", error)
        else:
            self._finished += 1
            if self._finished < 2:
                return
        self.done.set_result((self._counts[0], self._counts[1]))

    def _ended(self, _: asyncio.Future[tuple[int, int]]) -> None:
        a, b = self._a, self._b
        a.stop_push()
        b.stop_push()
        a.close()
        b.close()


async def _task_relay(a: Duplex, b: Duplex, counts: list[int], chunk_size: int) -> tuple[int, int]:
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


class PushSource:
    """The receiving half of a `PushDuplex`: received chunks wait in ``_recv`` (in order)
    until a relay's `Push` takes them; what the sink cannot take yet stays there, and the
    subclass's `_released` hook (acknowledge to the HTTP/2 peer, resume reading) runs only
    for what was handed on, so flow control works as with `read()`."""

    _recv: list[bytes]
    _recv_eof: bool
    _error: BaseException | None
    _push: Push | None = None
    _push_held = False
    _eof_pushed = False

    def start_push(self, push: Push) -> None:
        self._push = push
        self._deliver()

    def stop_push(self) -> None:
        self._push = None

    def _released(self, size: int) -> None:
        """``size`` received bytes left this duplex."""

    def _deliver(self) -> None:
        push = self._push
        if push is None or self._push_held:
            return
        if self._error is not None:
            self._push = None
            push.fail(self._error)
            return
        recv = self._recv
        while recv:
            chunk = recv.pop(0)
            try:
                more = push.feed(chunk)
            except Exception as exc:
                self._push = None
                push.fail(exc)
                return
            self._released(len(chunk))
            if not more:
                self._push_held = True
                push.sink.when_unblocked(self._unhold)
                return
        if self._recv_eof and not self._eof_pushed:
            self._eof_pushed = True
            push.end()

    def _unhold(self) -> None:
        self._push_held = False
        self._deliver()
