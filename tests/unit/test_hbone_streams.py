"""HBONE stream edge cases: early data, resets before the answer, counts after a lost
connection. Real mTLS on loopback, a real TCP app where one is dialled."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, GoAwayFrame, RstStreamFrame, WindowUpdateFrame

from mesh.hbone.connection import HboneStream
from mesh.hbone.protocol import ConnectRequest, HboneError
from mesh.hbone.relay import StreamDuplex, relay
from mesh.spiffe import SpiffeId
from tests.unit.hbone_rig import (
    PREFACE,
    TIMEOUT,
    Pki,
    RawPeer,
    dial,
    make_pki,
    running_server,
)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


@contextmanager
def loop_failures() -> Iterator[list[dict[str, object]]]:
    """What reaches the loop's exception handler (a failed callback or task) meanwhile."""
    loop = asyncio.get_running_loop()
    failures: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: failures.append(context))
    try:
        yield failures
    finally:
        loop.set_exception_handler(None)


class App:
    """A TCP echo server standing for the destination application; counts its connections."""

    def __init__(self) -> None:
        self.connections = 0

    async def __aenter__(self) -> App:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.address: tuple[str, int] = self.server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


async def test_data_before_the_answer_resets_the_stream(pki: Pki) -> None:
    """RFC 9113 §8.5: DATA before 2xx is PROTOCOL_ERROR; the handler never sees it."""
    outcome: asyncio.Future[str] = asyncio.Future()
    dialling = asyncio.Event()

    async def handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        try:
            dialling.set()
            await asyncio.sleep(TIMEOUT)  # stands for dialling the app
        except asyncio.CancelledError:
            outcome.set_result("cancelled")
            raise
        await stream.accept()
        outcome.set_result(f"read {await stream.read()!r}")

    async with running_server(pki.server, handler) as srv:
        peer = await RawPeer.open(srv, pki.client)
        peer.send(PREFACE, peer.connect(1))
        await asyncio.wait_for(dialling.wait(), TIMEOUT)
        peer.send(DataFrame(1, b"too early"))
        async with asyncio.timeout(TIMEOUT):
            while not isinstance(frame := await peer.next_frame(), RstStreamFrame):
                assert frame is not None, "server closed the connection"
        assert frame.stream_id == 1 and frame.error_code == ErrorCodes.PROTOCOL_ERROR
        assert await asyncio.wait_for(outcome, TIMEOUT) == "cancelled"
        assert 1 not in peer.responses


async def test_reset_before_the_answer_opens_no_upstream(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A CONNECT the client gives up on stops its handler before it dials the app."""
    dialling = asyncio.Event()
    release = asyncio.Event()
    handler_done: asyncio.Future[None] = asyncio.Future()

    async with App() as app:

        async def handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
            try:
                dialling.set()
                await release.wait()  # the app dial is slow
                reader, writer = await asyncio.open_connection(*app.address)
                await stream.accept()
                await relay(stream, StreamDuplex(reader, writer))
            finally:
                handler_done.set_result(None)

        async with running_server(pki.server, handler) as srv:
            conn = await dial(srv, pki.client)
            opening = asyncio.create_task(conn.open_stream("10.0.0.7:80"))
            await asyncio.wait_for(dialling.wait(), TIMEOUT)
            opening.cancel()  # resets the stream
            await asyncio.wait_for(handler_done, TIMEOUT)
            release.set()
            assert app.connections == 0
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            conn.close()


async def test_relay_counts_survive_a_lost_connection(pki: Pki) -> None:
    """The server's relay reports the bytes that flowed when the client's connection dies."""
    counts: asyncio.Future[tuple[int, int]] = asyncio.Future()

    async with App() as app:

        async def handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
            reader, writer = await asyncio.open_connection(*app.address)
            await stream.accept()
            counts.set_result(await relay(stream, StreamDuplex(reader, writer)))

        async with running_server(pki.server, handler) as srv:
            conn = await dial(srv, pki.client)
            stream = await conn.open_stream("10.0.0.7:80")
            payload = os.urandom(100_000)
            stream.write(payload)
            await stream.drain()
            echoed = b""
            async with asyncio.timeout(TIMEOUT):
                while len(echoed) < len(payload):
                    echoed += await stream.read()
            conn._abort()  # the client side vanishes: no RST_STREAM, no GOAWAY
            assert await asyncio.wait_for(counts, TIMEOUT) == (len(payload), len(payload))


@pytest.mark.parametrize(
    "frame",
    [RstStreamFrame(1, 14), GoAwayFrame(0, last_stream_id=1, error_code=0)],
    ids=["reset with an unknown error code", "GOAWAY covering the open stream"],
)
async def test_peer_ending_a_stream_oddly_ends_the_handler_quietly(
    pki: Pki, caplog: pytest.LogCaptureFixture, frame: RstStreamFrame | GoAwayFrame
) -> None:
    """RFC 9113 §7: unknown codes carry no meaning; after a GOAWAY h2 sends nothing more, so
    the stream ends either way. The handler sees its stream fail, nothing is logged as an
    error and no task fails behind our back (found by tests/fuzz)."""
    answering = asyncio.Event()
    outcome: asyncio.Future[str] = asyncio.Future()

    async def handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        answering.set()
        try:
            await asyncio.sleep(0.05)
            await stream.accept()
            await stream.read()
            outcome.set_result("served")
        except HboneError as exc:
            outcome.set_result(type(exc).__name__)
        except asyncio.CancelledError:  # ended before it answered: nothing to clean up
            outcome.set_result("cancelled")
            raise

    with loop_failures() as failures:
        async with running_server(pki.server, handler) as srv:
            peer = await RawPeer.open(srv, pki.client)
            peer.send(PREFACE, peer.connect(1))
            await asyncio.wait_for(answering.wait(), TIMEOUT)
            peer.send(frame)
            assert await asyncio.wait_for(outcome, TIMEOUT) in {
                "cancelled",
                "HboneStreamReset",
                "HboneConnectionClosed",
            }
            peer.close()
    assert failures == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_reset_arriving_with_a_window_update_fails_only_its_stream(pki: Pki) -> None:
    """WINDOW_UPDATE and RST_STREAM for a stream with queued data, in one read: h2 has
    closed the stream before we act on the window, so sending must stop quietly; the
    stream fails, the connection and its other streams go on (found by the bench)."""
    outcome: asyncio.Future[str] = asyncio.Future()
    blocked = asyncio.Event()

    async def handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        await stream.accept()
        if request.authority != "10.0.0.7:80":
            outcome_other = await stream.read()  # the second stream: echo one chunk
            stream.write(outcome_other)
            await stream.drain()
            return
        try:
            stream.write(b"x" * 200_000)  # more than the peer's 65535-byte window
            blocked.set()
            await stream.drain()
            await stream.read()
            outcome.set_result("served")
        except HboneError as exc:
            outcome.set_result(type(exc).__name__)

    with loop_failures() as failures:
        async with running_server(pki.server, handler) as srv:
            peer = await RawPeer.open(srv, pki.client)
            peer.send(PREFACE, peer.connect(1))
            await asyncio.wait_for(blocked.wait(), TIMEOUT)
            peer.send(
                WindowUpdateFrame(0, window_increment=1_000_000),
                WindowUpdateFrame(1, window_increment=100_000),
                RstStreamFrame(1, 8),
            )
            assert await asyncio.wait_for(outcome, TIMEOUT) == "HboneStreamReset"
            peer.send(peer.connect(3, "10.0.0.8:80"))
            async with asyncio.timeout(TIMEOUT):
                while 3 not in peer.responses:  # DATA may only follow the answer
                    assert await peer.next_frame() is not None, "the connection closed"
            assert peer.responses[3][b":status"] == b"200"
            peer.send(DataFrame(3, b"still here"))
            async with asyncio.timeout(TIMEOUT):
                while not (
                    isinstance(frame := await peer.next_frame(), DataFrame) and frame.stream_id == 3
                ):
                    assert frame is not None, "the connection closed"
            assert frame.data == b"still here"
            peer.close()
    assert failures == []
