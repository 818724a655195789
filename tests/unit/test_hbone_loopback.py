"""Real HBONE on 127.0.0.1: mTLS 1.3 handshake, HTTP/2 CONNECT tunnels, flow control, refusals."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events
import pytest
import uvloop

from mesh.hbone.connection import (
    HboneConnectError,
    HboneStream,
    HboneStreamReset,
    HboneTimeout,
)
from mesh.hbone.limits import HboneLimits
from mesh.hbone.protocol import ConnectRequest, HboneStreamRefused, Status
from mesh.hbone.relay import StreamDuplex, relay
from mesh.spiffe import SpiffeId
from mesh.tls import PeerIdentityError, TlsIdentity, client_context
from tests.unit.certs import make_ca, make_leaf
from tests.unit.hbone_rig import (
    CLIENT_ID,
    SERVER_ID,
    TIMEOUT,
    Pki,
    Server,
    dial,
    echo,
    make_pki,
    read_all,
    running_server,
)

DENIED_PORT = 403


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


async def echo_handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
    """Echo every byte back; one port refuses so tests can reach that path."""
    assert peer == CLIENT_ID
    if request.authority_port == DENIED_PORT:
        stream.refuse(Status.POLICY_DENIED)
        return
    await echo(stream, request, peer)


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Server]:
    async with running_server(pki.server, echo_handler) as srv:
        yield srv


async def test_echo_with_half_close(server: Server, pki: Pki) -> None:
    conn = await dial(server, pki.client)
    assert conn.peer == SERVER_ID
    stream = await conn.open_stream("10.0.0.7:8080", [("baggage", "k8s.pod.name=sleep")])
    assert stream.peer == SERVER_ID
    stream.write(b"hello ")
    stream.write(b"world")
    await asyncio.wait_for(stream.drain(), TIMEOUT)
    assert await asyncio.wait_for(stream.read(5), TIMEOUT) == b"hello"
    stream.write_eof()
    # The server sees our EOF, finishes echoing, and half-closes its side in turn.
    assert await read_all(stream) == b" world"
    assert stream.is_closed
    assert conn.active_streams == 0
    conn.close()
    await asyncio.wait_for(conn.wait_closed(), TIMEOUT)


async def test_handler_sees_request_and_peer(pki: Pki) -> None:
    seen: asyncio.Future[tuple[ConnectRequest, SpiffeId, str | None]] = asyncio.Future()

    async def handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        seen.set_result((request, peer, stream.peer_address))
        await stream.accept()
        stream.write_eof()
        await stream.drain()

    async with running_server(pki.server, handler) as srv:
        conn = await dial(srv, pki.client)
        stream = await conn.open_stream("[fd00::5]:9080", [("forwarded", "for=10.1.1.1")])
        request, peer, address = await asyncio.wait_for(seen, TIMEOUT)
        assert request == ConnectRequest("fd00::5", 9080, (("forwarded", "for=10.1.1.1"),))
        assert peer == CLIENT_ID
        assert address == "127.0.0.1"
        assert await read_all(stream) == b""
        stream.close()
        conn.close()


async def test_multi_megabyte_both_ways_respects_flow_control(server: Server, pki: Pki) -> None:
    """20 MiB exceeds every window, so it only completes if windows are reopened as read."""
    payload = os.urandom(20 * 1024 * 1024)
    conn = await dial(server, pki.client)
    stream = await conn.open_stream("10.0.0.7:8080")

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(payload), 100_000):
            stream.write(bytes(view[offset : offset + 100_000]))
            await stream.drain()
        stream.write_eof()
        await stream.drain()

    sender = asyncio.create_task(send())
    echoed = await asyncio.wait_for(read_all(stream), 60)
    await asyncio.wait_for(sender, TIMEOUT)
    assert len(echoed) == len(payload)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    conn.close()


async def test_slow_reader_bounds_buffers(pki: Pki) -> None:
    """A writer facing a reader that never reads must block in drain(), not buffer forever."""
    started = asyncio.Event()

    async def sink(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        await stream.accept()
        started.set()
        await asyncio.sleep(TIMEOUT)

    async with running_server(pki.server, sink) as srv:
        conn = await dial(srv, pki.client)
        stream = await conn.open_stream("10.0.0.7:8080")
        await asyncio.wait_for(started.wait(), TIMEOUT)
        written = 0

        async def flood() -> None:
            nonlocal written
            while True:
                stream.write(b"x" * 65536)
                written += 65536
                await stream.drain()

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(flood(), 1.0)
        # Stream window (4 MiB) + our queue (256 KiB) + socket buffers: far below unbounded.
        assert 4 * 1024 * 1024 <= written < 24 * 1024 * 1024
        stream.close()
        conn.close()


async def test_concurrent_streams_share_one_connection(server: Server, pki: Pki) -> None:
    conn = await dial(server, pki.client)

    async def one(i: int) -> tuple[bytes, bytes]:
        stream = await conn.open_stream(f"10.0.0.{i}:80")
        body = f"stream {i} ".encode() * 10000
        stream.write(body)
        stream.write_eof()
        await stream.drain()
        return body, await read_all(stream)

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1, 21))), TIMEOUT)
    assert len({sent for sent, _ in results}) == 20
    assert all(sent == echoed for sent, echoed in results)
    assert conn.active_streams == 0
    assert conn.is_usable
    conn.close()


async def test_waits_for_peer_stream_limit(pki: Pki) -> None:
    """The server allows one stream at a time: a second open waits for the first to end."""
    async with running_server(
        pki.server, echo_handler, HboneLimits(max_concurrent_streams=1)
    ) as srv:
        conn = await dial(srv, pki.client)
        first = await conn.open_stream("10.0.0.1:80")
        with pytest.raises(HboneTimeout):
            await conn.open_stream("10.0.0.3:80", timeout=0.2)
        second = asyncio.create_task(conn.open_stream("10.0.0.2:80"))
        await asyncio.sleep(0.2)
        assert not second.done()
        first.write_eof()
        assert await read_all(first) == b""
        stream = await asyncio.wait_for(second, TIMEOUT)
        stream.write(b"2")
        stream.write_eof()
        assert await read_all(stream) == b"2"
        conn.close()


async def test_refusal_raises_with_status(server: Server, pki: Pki) -> None:
    conn = await dial(server, pki.client)
    with pytest.raises(HboneStreamRefused) as refused:
        await conn.open_stream(f"10.0.0.7:{DENIED_PORT}")
    assert refused.value.status == 403
    # The connection survives a refused stream.
    stream = await conn.open_stream("10.0.0.7:80")
    stream.write(b"ping")
    stream.write_eof()
    assert await read_all(stream) == b"ping"
    conn.close()


async def test_reset_reaches_the_other_side(pki: Pki) -> None:
    outcome: asyncio.Future[BaseException | bytes] = asyncio.Future()

    async def handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        await stream.accept()
        try:
            outcome.set_result(await stream.read(10))
        except HboneStreamReset as exc:
            outcome.set_result(exc)

    async with running_server(pki.server, handler) as srv:
        conn = await dial(srv, pki.client)
        stream = await conn.open_stream("10.0.0.7:80")
        stream.reset()
        assert isinstance(await asyncio.wait_for(outcome, TIMEOUT), HboneStreamReset)
        with pytest.raises(HboneStreamReset):
            await stream.read(10)
        conn.close()


async def test_handler_crash_answers_503(pki: Pki) -> None:
    async def handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        raise RuntimeError("app dial failed")

    async with running_server(pki.server, handler) as srv:
        conn = await dial(srv, pki.client)
        with pytest.raises(HboneStreamRefused) as refused:
            await conn.open_stream("10.0.0.7:80")
        assert refused.value.status == 503
        conn.close()


async def test_wrong_server_identity_is_rejected(server: Server, pki: Pki) -> None:
    other = SpiffeId("cluster.local", "default", "not-httpbin")
    with pytest.raises(PeerIdentityError, match="not-httpbin"):
        await dial(server, pki.client, expected=other)
    conn = await dial(server, pki.client, expected={other, SERVER_ID})
    assert conn.peer == SERVER_ID
    conn.close()


async def test_client_from_other_ca_fails_handshake(server: Server, pki: Pki) -> None:
    # The stranger trusts our root (so it accepts the server) but its own cert is foreign.
    stranger = make_leaf(make_ca("another mesh"), CLIENT_ID)
    impostor = TlsIdentity(stranger.cert_chain_pem, stranger.key_pem, pki.ca.root_pem)
    with pytest.raises(HboneConnectError, match=r"reject our certificate|handshake"):
        await dial(server, impostor)
    # And the server keeps serving legitimate clients.
    conn = await dial(server, pki.client)
    conn.close()


async def test_server_from_other_ca_fails_handshake(pki: Pki) -> None:
    rogue = make_leaf(make_ca("rogue"), SERVER_ID)
    async with running_server(rogue, echo_handler) as srv:
        with pytest.raises(HboneConnectError, match="handshake"):
            await dial(srv, pki.client)


async def test_malformed_authority_gets_400(server: Server, pki: Pki) -> None:
    """A raw h2 client (ours validates before sending) sends CONNECT with a bad authority."""
    ctx = client_context(pki.client)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(*server.address, ssl=ctx, server_hostname=""), TIMEOUT
    )
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    h2c.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.7")])
    writer.write(h2c.data_to_send())
    status = None
    async with asyncio.timeout(TIMEOUT):
        while status is None:
            data = await reader.read(65536)
            assert data, "server closed without answering"
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
            writer.write(h2c.data_to_send())
    assert status == b"400"
    writer.close()


async def test_relay_between_tcp_and_hbone(server: Server, pki: Pki) -> None:
    """A plaintext TCP client relayed into an HBONE tunnel, as ztunnel's outbound path does."""
    conn = await dial(server, pki.client)
    done: asyncio.Future[tuple[int, int]] = asyncio.Future()

    async def on_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = await conn.open_stream("10.0.0.7:80")
        done.set_result(await relay(StreamDuplex(reader, writer), stream))

    capture = await asyncio.start_server(on_app, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*capture.sockets[0].getsockname()[:2])
        payload = os.urandom(3 * 1024 * 1024)
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(-1), TIMEOUT)
        assert echoed == payload
        assert await asyncio.wait_for(done, TIMEOUT) == (len(payload), len(payload))
        writer.close()
    finally:
        capture.close()
        conn.close()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_echo_on_each_event_loop(
    pki: Pki, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    async def scenario() -> bytes:
        async with running_server(pki.server, echo_handler) as srv:
            conn = await dial(srv, pki.client)
            streams = await asyncio.gather(*(conn.open_stream(f"10.0.0.{i}:80") for i in (1, 2)))
            payload = os.urandom(6 * 1024 * 1024)

            async def send(stream: HboneStream) -> None:
                for offset in range(0, len(payload), 65536):
                    stream.write(payload[offset : offset + 65536])
                    await stream.drain()
                stream.write_eof()
                await stream.drain()

            senders = [asyncio.create_task(send(s)) for s in streams]
            results = await asyncio.gather(*(read_all(s) for s in streams))
            await asyncio.gather(*senders)
            conn.close()
            await asyncio.wait_for(conn.wait_closed(), TIMEOUT)
            assert results == [payload, payload]
            return results[0][:4]

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        assert len(runner.run(asyncio.wait_for(scenario(), 60))) == 4
