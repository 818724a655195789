"""The push relay (TcpDuplex <-> HboneStream joined in protocol callbacks) and write
coalescing: order, half-close, counts, back-pressure and teardown, on real loopback
sockets with mTLS. No timing: every wait is for a condition, bounded only by TIMEOUT."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from mesh.hbone.connection import Handler, HboneClientConnection, HboneStream
from mesh.hbone.protocol import ConnectRequest
from mesh.hbone.relay import Duplex, Push, _PushRelay, relay
from mesh.hbone.tcp import READ_BUFFER_LIMIT, TcpDuplex, connect_tcp
from mesh.spiffe import SpiffeId
from tests.unit.hbone_rig import TIMEOUT, Pki, dial, echo, make_pki, running_server


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@asynccontextmanager
async def tcp_server(on_connect: Callable[[TcpDuplex], None]) -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.get_running_loop().create_server(
        lambda: TcpDuplex(on_connect=on_connect), "127.0.0.1", 0
    )
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()


async def tcp_client(address: tuple[str, int]) -> TcpDuplex:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return await connect_tcp(sock)


def inbound(
    app_address: tuple[str, int], counts: asyncio.Future[tuple[int, int]] | None = None
) -> Handler:
    """ztunnel's inbound shape: accept the tunnel and relay it to a TCP app."""

    async def handler(stream: HboneStream, req: ConnectRequest, peer: SpiffeId) -> None:
        upstream = await tcp_client(app_address)
        await stream.accept()
        relayed = await relay(stream, upstream)
        if counts is not None:
            counts.set_result(relayed)

    return handler


async def read_to_eof(duplex: TcpDuplex) -> bytes:
    chunks = []
    async with asyncio.timeout(TIMEOUT):
        while data := await duplex.read(1 << 20):
            chunks.append(data)
    return b"".join(chunks)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.01)


async def test_tcp_to_hbone_both_ways_with_half_close(pki: Pki) -> None:
    """ztunnel's outbound shape: a TCP client relayed into a tunnel to an echo server;
    the client's EOF travels as END_STREAM, the echo's as a FIN."""
    async with running_server(pki.server, echo) as srv:
        conn = await dial(srv, pki.client)
        done: asyncio.Future[tuple[int, int]] = asyncio.Future()

        async def proxy(client: TcpDuplex) -> None:
            stream = await conn.open_stream("10.0.0.7:80")
            done.set_result(await relay(client, stream))

        tasks = set()
        async with tcp_server(lambda c: tasks.add(asyncio.create_task(proxy(c)))) as address:
            client = await tcp_client(address)
            payload = os.urandom(3 * 1024 * 1024 + 17)
            for offset in range(0, len(payload), 100_000):
                client.write(payload[offset : offset + 100_000])
                await client.drain()
            client.write_eof()
            assert await read_to_eof(client) == payload
            assert await asyncio.wait_for(done, TIMEOUT) == (len(payload), len(payload))
            client.close()
        conn.close()


async def test_hbone_to_tcp_app_replies_after_eof(pki: Pki) -> None:
    """ztunnel's inbound shape: the app answers only after the request's EOF (as an HTTP/1.0
    server would), then closes; both directions arrive whole, in order."""
    request = os.urandom(200_000)
    response = os.urandom(500_000)
    counts: asyncio.Future[tuple[int, int]] = asyncio.Future()
    app_got: asyncio.Future[bytes] = asyncio.Future()

    async def app(duplex: TcpDuplex) -> None:
        app_got.set_result(await read_to_eof(duplex))
        duplex.write(response)
        duplex.write_eof()
        await duplex.drain()

    tasks = set()
    async with (
        tcp_server(lambda d: tasks.add(asyncio.create_task(app(d)))) as app_address,
        running_server(pki.server, inbound(app_address, counts)) as srv,
    ):
        conn = await dial(srv, pki.client)
        stream = await conn.open_stream("10.0.0.7:80")
        stream.write(request)
        stream.write_eof()
        await stream.drain()
        received = b""
        async with asyncio.timeout(TIMEOUT):
            while data := await stream.read():
                received += data
        assert await asyncio.wait_for(app_got, TIMEOUT) == request
        assert received == response
        assert await asyncio.wait_for(counts, TIMEOUT) == (len(request), len(response))
        conn.close()


async def test_a_sink_that_does_not_read_stops_the_sender(pki: Pki) -> None:
    """An app that never reads: the tunnel stops acknowledging, so what the relay holds stays
    near the stream window instead of growing with what the client offers."""
    app_connected: asyncio.Future[TcpDuplex] = asyncio.Future()
    async with (
        tcp_server(app_connected.set_result) as app_address,
        running_server(pki.server, inbound(app_address), sockbuf=65536) as srv,
    ):
        conn = await dial(srv, pki.client)
        stream = await conn.open_stream("10.0.0.7:80")
        app = await asyncio.wait_for(app_connected, TIMEOUT)
        app.transport.pause_reading()
        chunk = b"x" * 65536
        sent = 0
        writing = asyncio.create_task(_write_forever(stream, chunk))
        await until(lambda: conn._h2.local_flow_control_window(stream.stream_id) == 0)
        sent = stream._send_size
        await asyncio.sleep(0.2)  # nothing below depends on how long this is
        assert conn._h2.local_flow_control_window(stream.stream_id) == 0
        assert stream._send_size == sent  # the writer waits in drain()
        server_conn = srv.protocols[0]
        server_stream = next(iter(server_conn._streams.values()))
        limits = server_conn._limits
        assert sum(map(len, server_stream._recv)) <= limits.stream_window
        writing.cancel()
        conn.close()


async def _write_forever(duplex: Duplex, chunk: bytes) -> None:
    while True:
        duplex.write(chunk)
        await duplex.drain()


async def test_closing_one_side_ends_the_relay_and_resets_the_tunnel(pki: Pki) -> None:
    """What a policy change does to a now-denied connection: closing the TCP side ends the
    relay, which resets the tunnel; the bytes that flowed are counted."""
    app_connected: asyncio.Future[TcpDuplex] = asyncio.Future()
    relayed: asyncio.Future[tuple[int, int]] = asyncio.Future()
    async with (
        tcp_server(app_connected.set_result) as app_address,
        running_server(pki.server, inbound(app_address, relayed)) as srv,
    ):
        conn = await dial(srv, pki.client)
        stream = await conn.open_stream("10.0.0.7:80")
        stream.write(b"hello")
        await stream.drain()
        app = await asyncio.wait_for(app_connected, TIMEOUT)
        assert await asyncio.wait_for(app.read(5), TIMEOUT) == b"hello"
        server_stream = next(iter(srv.protocols[0]._streams.values()))
        server_stream.close()  # as ConnectionTable.recheck closes both sides
        assert await asyncio.wait_for(relayed, TIMEOUT) == (5, 0)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(stream.read(), TIMEOUT)
        assert await read_to_eof(app) == b""
        conn.close()


async def test_writes_of_one_iteration_leave_as_one_transport_write(pki: Pki) -> None:
    """DATA for several streams produced in one loop iteration shares one TLS write, and
    each stream's bytes still arrive in order."""
    async with running_server(pki.server, echo) as srv:
        conn: HboneClientConnection = await dial(srv, pki.client)
        streams = [await conn.open_stream(f"10.0.0.{i}:80") for i in range(1, 4)]
        assert conn._transport is not None
        transport = conn._transport
        writes: list[int] = []
        original = transport.write

        def counting_write(data: bytes | bytearray | memoryview) -> None:
            writes.append(len(data))
            original(data)

        transport.write = counting_write  # type: ignore[method-assign]
        for round_ in range(3):
            for stream in streams:
                stream.write(f"{stream.stream_id}:{round_};".encode())
        for stream in streams:
            stream.write_eof()
        await until(lambda: bool(writes))
        assert len(writes) == 1
        for stream in streams:
            echoed = b""
            async with asyncio.timeout(TIMEOUT):
                while data := await stream.read():
                    echoed += data
            sid = stream.stream_id
            assert echoed == f"{sid}:0;{sid}:1;{sid}:2;".encode()
        conn.close()


async def test_tcp_duplex_stops_reading_when_nobody_takes_its_bytes() -> None:
    """Unread bytes of a TcpDuplex stay near READ_BUFFER_LIMIT: it pauses the socket."""
    server_side: asyncio.Future[TcpDuplex] = asyncio.Future()
    async with tcp_server(server_side.set_result) as address:
        client = await tcp_client(address)
        duplex = await asyncio.wait_for(server_side, TIMEOUT)
        writing = asyncio.create_task(_write_forever(client, b"y" * 65536))
        await until(lambda: duplex._reading_paused)
        held = duplex._recv_size
        await asyncio.sleep(0.2)  # nothing below depends on how long this is
        assert duplex._recv_size == held <= READ_BUFFER_LIMIT + 256 * 1024
        data = await asyncio.wait_for(duplex.read(1 << 30), TIMEOUT)
        assert data and set(data) == {ord("y")}
        writing.cancel()
        client.abort()


def _relay_objects() -> list[object]:
    """The push relay's per-connection objects alive now."""
    return [o for o in gc.get_objects() if isinstance(o, Push | _PushRelay)]


@asynccontextmanager
async def tcp_pairs(count: int) -> AsyncIterator[list[tuple[TcpDuplex, TcpDuplex]]]:
    """``count`` loopback TCP connections as (client, server) duplexes."""
    accepted: list[TcpDuplex] = []
    async with tcp_server(accepted.append) as address:
        clients = [await tcp_client(address) for _ in range(count)]
        await until(lambda: len(accepted) == count)
        yield list(zip(clients, accepted, strict=True))


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting frees: a cycle through the relay would keep it alive."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_push_relay_half_closes_each_way_and_leaves_nothing(no_gc: None) -> None:
    """relay() of two push duplexes is a future, not a coroutine; each side's EOF reaches
    the other alone (the other direction goes on after it), the counts come once both
    ended, both sides are closed and no relay object remains."""
    async with tcp_pairs(2) as [(left, left_end), (right, right_end)]:
        done = relay(left_end, right_end)
        assert isinstance(done, asyncio.Future)
        left.write(b"request")
        left.write_eof()
        assert await read_to_eof(right) == b"request"
        assert not done.done()
        right.write(b"reply after the request's EOF")
        right.write_eof()
        assert await read_to_eof(left) == b"reply after the request's EOF"
        assert await asyncio.wait_for(done, TIMEOUT) == (7, 29)
        await asyncio.sleep(0)  # the future's callbacks
        assert left_end.transport.is_closing() and right_end.transport.is_closing()
        assert _relay_objects() == []
        left.close()
        right.close()


async def test_push_relay_ends_once_on_reset_and_releases(no_gc: None) -> None:
    """A side that fails (the peer reset it) ends the relay with the counts so far and
    closes the other side; nothing of the relay stays."""
    async with tcp_pairs(2) as [(left, left_end), (right, right_end)]:
        done = relay(left_end, right_end)
        left.write(b"abc")
        assert await asyncio.wait_for(right.read(10), TIMEOUT) == b"abc"
        linger = struct.pack("ii", 1, 0)  # close with a RST: left_end fails
        left.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        left.abort()
        assert await asyncio.wait_for(done, TIMEOUT) == (3, 0)
        assert await read_to_eof(right) == b""  # the other side was closed for it
        await asyncio.sleep(0)
        assert _relay_objects() == []
        right.close()


async def test_cancelling_the_relays_waiter_closes_both_sides(no_gc: None) -> None:
    async with tcp_pairs(2) as [(left, left_end), (right, right_end)]:
        waiter = asyncio.ensure_future(relay(left_end, right_end))
        await asyncio.sleep(0)
        waiter.cancel()
        assert await read_to_eof(left) == b""
        assert await read_to_eof(right) == b""
        await asyncio.sleep(0)
        assert _relay_objects() == []
        left.close()
        right.close()
