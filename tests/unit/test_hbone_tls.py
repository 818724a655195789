"""HBONE's own TLS (an SSLObject between MemoryBIOs over a plain TCP transport): no event
loop TLS transport per connection, records decrypted in order also when they do not fit the
shared read buffer, close_notify on close."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import ssl
from collections.abc import Iterator

import pytest

from mesh.hbone import connection
from mesh.hbone.connection import HboneClientConnection
from mesh.tls import client_context
from tests.unit.hbone_rig import TIMEOUT, Pki, dial, echo, make_pki, read_all, running_server


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def _loop_tls_protocols() -> list[object]:
    """The event loops' TLS protocol objects alive now (uvloop's or asyncio's)."""
    return [o for o in gc.get_objects() if type(o).__name__ == "SSLProtocol"]


async def test_connections_hold_no_event_loop_tls_transport(pki: Pki) -> None:
    """Each end is one SSLObject over the plain TCP transport: uvloop's TLS transport would
    malloc a 256 KiB read buffer per connection."""
    async with running_server(pki.server, echo) as srv:
        conns = [await dial(srv, pki.client) for _ in range(3)]
        for conn in conns:
            stream = await conn.open_stream("10.0.0.1:80")
            stream.write(b"ping")
            stream.write_eof()
            assert await read_all(stream) == b"ping"
        ends: list[connection._HboneConnection] = [*conns, *srv.protocols]
        assert len(ends) == 6
        for end in ends:
            assert isinstance(end._tls, ssl.SSLObject)
            assert end._transport is not None
            assert end._transport.get_extra_info("ssl_object") is None
        assert _loop_tls_protocols() == []
        for conn in conns:
            conn.close()


@pytest.fixture
def small_read_buffer() -> Iterator[None]:
    """A 1000-byte decrypt buffer: every read holds more plaintext than fits in it."""
    local = connection._read_buffers
    saved = getattr(local, "buffer", None)
    local.buffer = memoryview(bytearray(1000))
    try:
        yield
    finally:
        if saved is None:
            del local.buffer
        else:
            local.buffer = saved


async def test_what_does_not_fit_the_read_buffer_follows_in_order(
    pki: Pki, small_read_buffer: None
) -> None:
    async with running_server(pki.server, echo) as srv:
        conn = await dial(srv, pki.client)
        stream = await conn.open_stream("10.0.0.1:80")
        payload = os.urandom(2 * 1024 * 1024)

        async def send() -> None:
            for offset in range(0, len(payload), 100_000):
                stream.write(payload[offset : offset + 100_000])
                await stream.drain()
            stream.write_eof()
            await stream.drain()

        sender = asyncio.create_task(send())
        assert await read_all(stream) == payload
        await sender
        conn.close()


class _TlsPeer:
    """A client doing TLS by hand over a plain socket, to see the records themselves."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing)

    async def _exchange(self) -> bool:
        """Send what TLS produced and feed one read; False at TCP EOF."""
        loop = asyncio.get_running_loop()
        if self.outgoing.pending:
            await loop.sock_sendall(self.sock, self.outgoing.read())
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), TIMEOUT)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                assert await self._exchange(), "server closed during the handshake"
        await asyncio.get_running_loop().sock_sendall(self.sock, self.outgoing.read())

    async def read_until_closed(self) -> type[BaseException]:
        """Read application data until TLS ends; how it ended."""
        while True:
            try:
                while self.tls.read(65536):
                    pass
                return ssl.SSLZeroReturnError  # read() gave b"": close_notify
            except ssl.SSLWantReadError:
                await self._exchange()
            except ssl.SSLError as exc:
                return type(exc)


async def test_server_closing_sends_close_notify(pki: Pki) -> None:
    """A closing end says so in TLS (close_notify), so the peer can tell it from a cut."""
    async with running_server(pki.server, echo) as srv:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, srv.address)
            peer = _TlsPeer(sock, client_context(pki.client))
            await peer.handshake()
            async with asyncio.timeout(TIMEOUT):
                while not srv.protocols or not srv.protocols[0]._tls_up:
                    await asyncio.sleep(0.01)
            srv.protocols[0].close()
            assert await peer.read_until_closed() is ssl.SSLZeroReturnError
        finally:
            sock.close()


async def test_client_handshake_failure_leaves_nothing_open(pki: Pki) -> None:
    """A server that is no TLS server: the connect fails with the handshake error."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)

    async def answer_garbage() -> None:
        peer, _ = await asyncio.get_running_loop().sock_accept(listener)
        with peer:
            await asyncio.get_running_loop().sock_sendall(peer, b"HTTP/1.1 400 Bad\r\n\r\n" * 4)
            await asyncio.sleep(0.5)

    server = asyncio.create_task(answer_garbage())
    try:
        with pytest.raises(connection.HboneConnectError, match="mTLS handshake"):
            await HboneClientConnection.connect(
                socket.socket(socket.AF_INET, socket.SOCK_STREAM),
                client_context(pki.client),
                None,
                address=listener.getsockname()[:2],
                timeout=TIMEOUT,
            )
    finally:
        server.cancel()
        listener.close()
