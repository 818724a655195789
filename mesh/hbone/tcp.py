"""A plain TCP connection as a `PushDuplex`: the app-facing side of a relay.

`asyncio.Protocol` based rather than StreamReader/StreamWriter: a relay between this and an
HBONE stream moves each received chunk from `data_received` straight into the other side,
with no task waking up per chunk (the largest per-request cost in a profile of the stream
version), while `read()`/`drain()` keep it usable as an ordinary `Duplex`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import socket
from collections.abc import Callable
from typing import Any, cast

from mesh.hbone.relay import PushSource

# Received bytes nobody took yet above which we stop reading the socket.
READ_BUFFER_LIMIT = 256 * 1024


class TcpClosed(ConnectionError):
    """The connection was closed without an error (by us, or the peer after its EOF)."""


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class TcpDuplex(asyncio.Protocol, PushSource):
    """One TCP connection; ``on_connect`` (for accepted ones) runs once it is made."""

    def __init__(self, on_connect: Callable[[TcpDuplex], None] | None = None) -> None:
        self._on_connect = on_connect
        self._transport: asyncio.Transport | None = None
        # Lists, not deques: usually empty or one chunk, and an idle connection's deque
        # costs ~600 bytes (its first block), a list 56.
        self._recv: list[bytes] = []
        self._recv_size = 0
        self._recv_eof = False
        self._error: BaseException | None = None
        self._reading_paused = False
        self._write_paused = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._unblocked: list[Callable[[], None]] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default) if self._transport else default

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None
        return self._transport

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self._transport = cast(asyncio.Transport, transport)
        if self._on_connect is not None:
            self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._recv.append(data)
        self._recv_size += len(data)
        if self._recv_size > READ_BUFFER_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._received()

    def eof_received(self) -> bool:
        self._recv_eof = True
        self._received()
        return True  # keep the transport open: the other direction may still send

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            self._error = exc or TcpClosed("TCP connection closed")
        self._received()
        self._wake_writers()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()

    # Duplex

    async def read(self, max_bytes: int = 65536) -> bytes:
        while not self._recv and not self._recv_eof and self._error is None:
            self._read_waiter = asyncio.get_running_loop().create_future()
            await self._read_waiter
        if not self._recv:
            if self._recv_eof or isinstance(self._error, TcpClosed):
                return b""
            assert self._error is not None
            raise self._error
        chunk = self._recv.pop(0)
        if len(chunk) > max_bytes:
            self._recv.insert(0, chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._released(len(chunk))
        return chunk

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self.transport.write(data)

    async def drain(self) -> None:
        while self._write_paused and self._error is None:
            waiter = asyncio.get_running_loop().create_future()
            self._unblocked.append(functools.partial(_wake, waiter))
            await waiter
        if self._error is not None:
            raise self._error

    def write_eof(self) -> None:
        transport = self._transport
        if transport is not None and transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()

    def close(self) -> None:
        """Close once written bytes are sent (the transport flushes first)."""
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # PushDuplex

    @property
    def write_blocked(self) -> bool:
        return self._write_paused

    def when_unblocked(self, callback: Callable[[], None]) -> None:
        self._unblocked.append(callback)

    def eof_sent(self) -> bool:
        if self._error is not None:
            raise self._error
        return True  # the transport sends the FIN after what it buffered

    def _released(self, size: int) -> None:
        self._recv_size -= size
        if self._reading_paused and self._recv_size <= READ_BUFFER_LIMIT // 2:
            self._reading_paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()

    def _received(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)
        if self._push is not None:
            self._deliver()

    def _wake_writers(self) -> None:
        if self._unblocked:
            callbacks, self._unblocked = self._unblocked, []
            for callback in callbacks:
                callback()


async def connect_tcp(sock: socket.socket) -> TcpDuplex:
    """A `TcpDuplex` over a connected socket (e.g. made in a pod's netns)."""
    _, duplex = await asyncio.get_running_loop().create_connection(TcpDuplex, sock=sock)
    return duplex


async def connect_nonblocking(
    sock: socket.socket, address: tuple[str, int], timeout: float
) -> None:
    """Connect a non-blocking socket, at most ``timeout``; OSError (the errno's subclass,
    e.g. ConnectionRefusedError) or TimeoutError if it fails. The socket stays the caller's.

    `connect_ex`, then a writer callback and a loop timer only if the handshake is not
    done yet: uvloop's `sock_connect` resolves the address in libuv's thread pool first
    (its numeric fast path needs a socket type, which it does not pass).
    """
    err = sock.connect_ex(address)
    if err == errno.EINPROGRESS:
        if _connected(sock):
            err = 0
        else:
            await _writable(asyncio.get_running_loop(), sock.fileno(), timeout, address)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        # OSError picks the subclass (ConnectionRefusedError, ...) from the errno.
        raise OSError(err, os.strerror(err), f"{address[0]}:{address[1]}")


def _connected(sock: socket.socket) -> bool:
    """Already connected: to an address of the socket's own netns (the app, for inbound
    delivery) the kernel has finished the handshake by the time `connect` returns
    EINPROGRESS, so there is no writable event to wait a loop iteration for."""
    try:
        sock.getpeername()
    except OSError:
        return False  # still connecting (ENOTCONN), or failed: SO_ERROR tells after the wait
    return True


async def _writable(
    loop: asyncio.AbstractEventLoop, fd: int, timeout: float, address: tuple[str, int]
) -> None:
    """Wait until a connecting socket is writable (connected or failed), at most ``timeout``."""
    done = loop.create_future()
    loop.add_writer(fd, _settle, done, True)
    timer = loop.call_later(timeout, _settle, done, False)
    try:
        await done
    finally:
        loop.remove_writer(fd)
        timer.cancel()
    if not done.result():
        raise TimeoutError(
            errno.ETIMEDOUT, f"connect timed out after {timeout}s", f"{address[0]}:{address[1]}"
        )


def _settle(done: asyncio.Future[bool], writable: bool) -> None:
    """Writable (the writer callback) or timed out (the timer): the first one tells."""
    if not done.done():
        done.set_result(writable)
