"""A hostile mesh peer against the HBONE server: every limit enforced as bytes arrive,
over real mTLS on loopback with a raw HTTP/2 client."""

from __future__ import annotations

import asyncio
import socket

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from mesh.hbone.connection import HboneStream, serve
from mesh.hbone.limits import HboneLimits
from mesh.hbone.protocol import ConnectRequest
from mesh.spiffe import SpiffeId
from mesh.tls import server_context
from tests.unit.hbone_rig import (
    PREFACE,
    TIMEOUT,
    Pki,
    RawPeer,
    dial,
    echo,
    frame_header,
    make_pki,
    read_all,
    running_server,
)

DATA, PING, ACK = 0x0, 0x6, 0x1
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


async def trickle_until_goaway(peer: RawPeer, chunk: bytes | Frame) -> tuple[int, GoAwayFrame]:
    """Send `chunk` every 10 ms until the server's GOAWAY arrives; the bytes sent before it."""
    goaway = asyncio.create_task(peer.goaway())
    raw = chunk if isinstance(chunk, bytes) else chunk.serialize()
    sent = 0
    async with asyncio.timeout(TIMEOUT):
        while not goaway.done():
            peer.send(raw)
            sent += len(raw)
            await asyncio.wait([goaway], timeout=0.01)
    return sent, goaway.result()


async def count_ping_acks(peer: RawPeer, wanted: int) -> int:
    """Read the server's frames in bulk (frame by frame is slow for 10^5 PINGs)."""
    buf = bytearray()
    acks = 0
    async with asyncio.timeout(TIMEOUT):
        while acks < wanted:
            data = await peer.reader.read(1 << 16)
            assert data, "server closed the connection"
            buf += data
            while len(buf) >= 9 and len(buf) >= 9 + (length := int.from_bytes(buf[:3])):
                acks += buf[3] == PING and buf[4] & ACK
                del buf[: 9 + length]
    return acks


async def test_oversized_frame_refused_from_its_header(pki: Pki) -> None:
    """A 16 MiB frame announcement gets FRAME_SIZE_ERROR before its payload is buffered."""
    limits = HboneLimits()
    async with running_server(pki.server, echo, limits) as srv:
        peer = await RawPeer.open(srv, pki.client)
        peer.send(PREFACE, frame_header(16 * MIB - 1, DATA, 0, 1))
        sent, goaway = await trickle_until_goaway(peer, b"x" * 1024)
        assert goaway.error_code == ErrorCodes.FRAME_SIZE_ERROR
        # Without the header check h2 waits for all 16 MiB before looking at the length.
        assert sent < limits.max_frame_size


async def test_garbage_after_preface_gets_protocol_error(pki: Pki) -> None:
    async with running_server(pki.server, echo) as srv:
        peer = await RawPeer.open(srv, pki.client)
        peer.send(PREFACE[:24], b"GET / HTTP/1.1\r\nHost: 10.0.0.7\r\n\r\n")
        assert (await peer.goaway()).error_code == ErrorCodes.PROTOCOL_ERROR


async def test_silent_client_closed_after_preface_deadline(pki: Pki) -> None:
    async with running_server(pki.server, echo, HboneLimits(preface_timeout=0.2)) as srv:
        peer = await RawPeer.open(srv, pki.client)
        assert (await peer.goaway()).error_code == ErrorCodes.SETTINGS_TIMEOUT


async def test_serve_bounds_the_tls_handshake(pki: Pki) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    server = await serve(
        listener, server_context(pki.server), echo, limits=HboneLimits(handshake_timeout=0.2)
    )
    try:
        reader, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        # No ClientHello ever: the server gives up on its own.
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
    finally:
        server.close()


async def test_unfinished_header_block_deadline(pki: Pki) -> None:
    limits = HboneLimits(headers_timeout=0.2, idle_timeout=60)
    async with running_server(pki.server, echo, limits) as srv:
        peer = await RawPeer.open(srv, pki.client)
        start = peer.connect(1)
        start.flags.discard("END_HEADERS")
        peer.send(PREFACE, start)
        assert (await peer.goaway()).error_code == ErrorCodes.PROTOCOL_ERROR


async def test_header_list_over_limit(pki: Pki) -> None:
    """Within one frame, small encoded (Huffman) but over the limit decoded."""
    async with running_server(pki.server, echo, HboneLimits(max_header_list_size=8192)) as srv:
        peer = await RawPeer.open(srv, pki.client)
        big = peer.connect(1, baggage="a" * 10000)
        assert len(big.data) < 8192
        peer.send(PREFACE, big)
        assert (await peer.goaway()).error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert 1 not in peer.responses


async def test_continuation_flood_refused_early(pki: Pki) -> None:
    limits = HboneLimits(max_header_list_size=16384)
    async with running_server(pki.server, echo, limits) as srv:
        peer = await RawPeer.open(srv, pki.client)
        start = peer.connect(1)
        start.flags.discard("END_HEADERS")
        peer.send(PREFACE, start)
        sent, goaway = await trickle_until_goaway(peer, ContinuationFrame(1, b"\x00" * 4096))
        # h2 alone would buffer 64 CONTINUATION frames and then answer PROTOCOL_ERROR.
        assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        assert sent < 64 * 4096


async def test_extra_stream_refused_others_keep_working(pki: Pki) -> None:
    async with running_server(pki.server, echo, HboneLimits(max_concurrent_streams=2)) as srv:
        peer = await RawPeer.open(srv, pki.client)
        peer.send(PREFACE, peer.connect(1), peer.connect(3), peer.connect(5))
        resets: dict[int, int] = {}
        async with asyncio.timeout(TIMEOUT):
            while not ({1, 3} <= peer.responses.keys() and 5 in resets):
                frame = await peer.next_frame()
                assert frame is not None, "server closed the connection"
                if isinstance(frame, RstStreamFrame):
                    resets[frame.stream_id] = frame.error_code
        assert resets == {5: ErrorCodes.REFUSED_STREAM}
        assert peer.responses[1][b":status"] == peer.responses[3][b":status"] == b"200"
        peer.send(
            DataFrame(1, b"one", flags=["END_STREAM"]), DataFrame(3, b"three", flags=["END_STREAM"])
        )
        echoed: dict[int, bytes] = {1: b"", 3: b""}
        async with asyncio.timeout(TIMEOUT):
            while echoed != {1: b"one", 3: b"three"}:
                frame = await peer.next_frame()
                assert frame is not None, "server closed the connection"
                if isinstance(frame, DataFrame):
                    echoed[frame.stream_id] += frame.data


async def test_peer_ignoring_flow_control_gets_flow_control_error(pki: Pki) -> None:
    """Unread bytes stay within the stream window, stored compactly even as 1-byte frames."""
    window = 65535
    accepted: asyncio.Future[HboneStream] = asyncio.Future()

    async def never_reads(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        await stream.accept()
        accepted.set_result(stream)
        await asyncio.sleep(TIMEOUT)

    async with running_server(pki.server, never_reads, HboneLimits(stream_window=window)) as srv:
        peer = await RawPeer.open(srv, pki.client)
        peer.send(PREFACE, peer.connect(1))
        stream = await asyncio.wait_for(accepted, TIMEOUT)
        tiny = 2000
        peer.send(*(DataFrame(1, b"x") for _ in range(tiny)))
        rest = window - tiny
        peer.send(*(DataFrame(1, b"y" * n) for n in (16384, 16384, 16384, rest - 3 * 16384)))
        async with asyncio.timeout(TIMEOUT):
            while sum(map(len, stream._recv)) < window:
                await asyncio.sleep(0.01)
        assert len(stream._recv) <= 8  # 2000 tiny frames were merged
        peer.send(DataFrame(1, b"z"))
        assert (await peer.goaway()).error_code == ErrorCodes.FLOW_CONTROL_ERROR


async def test_write_buffer_bounded_when_peer_does_not_read(pki: Pki) -> None:
    """A PING flood from a peer that never reads stops being read, not buffered forever."""
    limits = HboneLimits(write_high_water=64 * 1024, write_buffer_limit=512 * 1024)
    async with running_server(pki.server, echo, limits, sockbuf=16384) as srv:
        peer = await RawPeer.open(srv, pki.client, sockbuf=16384)
        peer.send(PREFACE)
        batch = b"".join(PingFrame(0, b"%08d" % i).serialize() for i in range(1000))
        pings = 0
        for _ in range(250):  # at most 4 MiB of PINGs
            peer.send(batch)
            pings += 1000
            try:
                await asyncio.wait_for(peer.writer.drain(), 0.5)
            except TimeoutError:
                break
        else:
            pytest.fail("the server kept reading although it could not write")
        (protocol,) = srv.protocols
        assert protocol._transport is not None
        # At most the limit plus the answers to one read (asyncio reads up to 256 KiB).
        assert protocol._transport.get_write_buffer_size() <= limits.write_buffer_limit + 256 * 1024
        # Once the peer reads, the server resumes and answers every PING.
        assert await count_ping_acks(peer, pings) == pings
        peer.close()


async def test_idle_server_connection_closed_busy_one_kept(pki: Pki) -> None:
    async with running_server(pki.server, echo, HboneLimits(idle_timeout=0.3)) as srv:
        busy = await dial(srv, pki.client)
        stream = await busy.open_stream("10.0.0.7:80")
        idle = await dial(srv, pki.client)
        await asyncio.wait_for(idle.wait_closed(), TIMEOUT)
        assert busy.is_usable
        stream.write(b"still here")
        stream.write_eof()
        assert await read_all(stream) == b"still here"
        busy.close()


async def test_settings_frame_is_the_only_valid_start(pki: Pki) -> None:
    async with running_server(pki.server, echo) as srv:
        peer = await RawPeer.open(srv, pki.client)
        peer.send(PREFACE[:24], SettingsFrame(0, flags=["ACK"]))
        assert (await peer.goaway()).error_code == ErrorCodes.PROTOCOL_ERROR


def test_limits_reject_values_that_break_http2() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        HboneLimits(max_frame_size=1000)
    with pytest.raises(ValueError, match="write_buffer_limit"):
        HboneLimits(write_buffer_limit=1024)
    with pytest.raises(ValueError, match="idle_timeout"):
        HboneLimits(idle_timeout=0)
