"""HEADERS on the HBONE fast path (mesh/hbone/h2fast.py) against an independent h2 peer.

Both directions: our client against a plain h2 server (our HPACK encoder, frames we build)
and our server against a plain h2 client (frames we parse, h2's decoder and validation).
The tests also check that h2's own HEADERS code did not run, so a fast path that silently
fell back would fail them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from h2.errors import ErrorCodes
from h2.stream import StreamState
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame, RstStreamFrame

from mesh.hbone import h2fast
from mesh.hbone.connection import HboneClientConnection, HboneStream
from mesh.hbone.limits import HboneLimits
from mesh.hbone.protocol import ConnectRequest, Status
from mesh.spiffe import SpiffeId
from tests.unit.hbone_rig import SERVER_ID
from tests.unit.test_hbone_fastpath import LIMITS, MemoryTransport, Pair, _count


def _count_received_headers(conn: h2.connection.H2Connection) -> list[int]:
    """Calls of h2's HEADERS frame handling (reached through its dispatch table)."""
    calls: list[int] = []
    original = conn._frame_dispatch_table[HeadersFrame]

    def counting(frame: HeadersFrame) -> Any:
        calls.append(frame.stream_id)
        return original(frame)

    conn._frame_dispatch_table[HeadersFrame] = counting
    return calls


def _frames(data: bytes) -> list[Frame]:
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


# Enough distinct authorities, each used twice, to fill and evict HPACK's 4 KiB table.
AUTHORITIES = [f"10.{i // 250}.{i % 250}.{i % 7 + 1}:{8000 + i}" for i in range(150)]


class ClientPair:
    """Our client protocol and a plain h2 server that answers every CONNECT with 200."""

    def __init__(self, limits: HboneLimits = LIMITS) -> None:
        self.client = HboneClientConnection(limits)
        self.client.peer = SERVER_ID
        self.transport = MemoryTransport()
        self.client.connection_made(self.transport)
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.server.initiate_connection()
        self.requests: dict[int, list[tuple[str, str]]] = {}

    def step(self) -> None:
        output, self.transport.output = bytes(self.transport.output), bytearray()
        for event in self.server.receive_data(output):
            if isinstance(event, h2.events.RequestReceived):
                assert event.stream_id is not None and event.headers is not None
                self.requests[event.stream_id] = [(str(n), str(v)) for n, v in event.headers]
                self.server.send_headers(event.stream_id, [(":status", "200")])
        answer = self.server.data_to_send()
        if answer:
            self.client.data_received(answer)

    async def run(self, until: Callable[[], bool]) -> None:
        for _ in range(200):
            self.step()
            await asyncio.sleep(0)
            if until():
                return
        raise AssertionError("the exchange did not finish")


async def test_our_hpack_encoder_stays_in_step_with_a_plain_h2_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """300 CONNECTs to 150 authorities with a changing extra header, through the dynamic
    table's insertions and evictions, every fifth one sent by h2's own send_headers: the
    plain h2 server decodes each block to exactly what was sent, so the encoder both paths
    share never drifted from its peer's decoder."""
    pair = ClientPair()
    fast_send = h2fast.send_headers
    n = 0

    def every_fifth_by_h2(*args: Any) -> bool:
        return n % 5 != 0 and fast_send(*args)

    monkeypatch.setattr(h2fast, "send_headers", every_fifth_by_h2)
    h2_sent = _count(monkeypatch, pair.client._h2, "send_headers")
    h2_received = _count_received_headers(pair.client._h2)
    await pair.run(lambda: pair.client._preface_done)
    sent: list[list[tuple[str, str]]] = []
    for n, authority in enumerate(AUTHORITIES * 2):
        extra = [("x-tunnel", f"t{n % 40}")]
        opening = asyncio.ensure_future(pair.client.open_stream(authority, extra))
        await pair.run(opening.done)
        stream = opening.result()
        sent.append([(":method", "CONNECT"), (":authority", authority), *extra])
        assert pair.requests[stream.stream_id] == sent[-1]
        stream.write_eof()
        stream.close()
        pair.step()
    assert len(pair.requests) == len(sent)
    assert len(h2_sent) == len(sent) // 5, "the other CONNECTs went through h2's send_headers"
    assert not h2_received, "the 200s went through h2's HEADERS frame handling"


async def test_our_hpack_decoder_stays_in_step_with_a_plain_h2_encoder() -> None:
    """300 CONNECTs to 150 authorities, every fifth split into HEADERS + CONTINUATION (left
    to h2's own frame handling), the rest on the fast path: each handler sees exactly the
    authority and header the plain h2 client sent."""
    seen: dict[int, tuple[str, str | None]] = {}

    async def record(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        seen[stream.stream_id] = (request.authority, request.header("x-tunnel"))
        stream.refuse(Status.POLICY_DENIED)

    pair = Pair(record, split=100_000)
    await pair.exchange(lambda: pair.server._preface_done)
    h2_received = _count_received_headers(pair.server._h2)
    expected: dict[int, tuple[str, str | None]] = {}
    for n, authority in enumerate(AUTHORITIES * 2):
        sid = 2 * n + 1
        headers = [(":method", "CONNECT"), (":authority", authority), ("x-tunnel", f"t{n % 40}")]
        expected[sid] = (authority, f"t{n % 40}")
        pair.client.send_headers(sid, headers)
        if n % 5 == 0:
            for frame in _frames(pair.client.data_to_send()):
                if isinstance(frame, HeadersFrame):
                    split = [
                        HeadersFrame(sid, frame.data[:3]),
                        ContinuationFrame(sid, frame.data[3:], flags=["END_HEADERS"]),
                    ]
                    pair.server.data_received(b"".join(f.serialize() for f in split))
                else:
                    pair.server.data_received(frame.serialize())
        await pair.exchange(functools.partial(seen.__contains__, sid))
    assert seen == expected
    assert len(h2_received) == len(expected) // 5


async def test_a_header_block_over_the_frame_size_goes_out_as_headers_and_continuation() -> None:
    pair = ClientPair()
    await pair.run(lambda: pair.client._preface_done)
    big = "v" * 40_000  # > 16384, the plain server's frame size; not Huffman-shrinkable enough
    opening = asyncio.ensure_future(pair.client.open_stream("10.0.0.7:80", [("x-big", big)]))
    await pair.run(opening.done)
    assert pair.requests[opening.result().stream_id][2] == ("x-big", big)


async def test_state_after_connect_and_refusal_is_what_h2_itself_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refusal is HEADERS with END_STREAM: both h2 state machines see the stream as
    h2's own send_headers would leave it, and the client its status and end."""
    states: list[StreamState] = []

    async def refuse(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        states.append(pair.server._h2.streams[stream.stream_id].state_machine.state)
        stream.refuse(Status.POLICY_DENIED)
        states.append(pair.server._h2.streams[stream.stream_id].state_machine.state)

    pair = Pair(refuse, split=100_000)
    await pair.exchange(lambda: pair.server._preface_done)
    h2_sent = _count(monkeypatch, pair.server._h2, "send_headers")
    h2_received = _count_received_headers(pair.server._h2)
    pair.client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.7:80")])
    await pair.exchange(lambda: pair.ended(1))
    response = next(e for e in pair.events if isinstance(e, h2.events.ResponseReceived))
    headers: list[Any] = list(response.headers or ())  # str with header_encoding
    assert headers == [(":status", "403")]
    assert response.stream_ended is not None
    assert states == [StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL]
    assert not h2_sent and not h2_received


def _raw_headers(pair: Pair, stream_id: int, headers: list[tuple[str, str]], **kw: Any) -> bytes:
    """A HEADERS frame encoded with the client's own encoder, so both tables stay in step."""
    flags = ["END_HEADERS", *(["END_STREAM"] if kw.get("end_stream") else [])]
    return HeadersFrame(stream_id, pair.client.encoder.encode(headers), flags=flags).serialize()


@pytest.mark.parametrize(
    "bad",
    [
        [(":method", "CONNECT"), (":authority", "10.0.0.7:80"), ("X-Upper", "1")],
        [(":method", "CONNECT"), (":authority", "10.0.0.7:80"), ("connection", "close")],
        [(":method", "CONNECT"), ("x-early", "1"), (":authority", "10.0.0.7:80")],
        [(":method", "CONNECT"), (":method", "CONNECT"), (":authority", "10.0.0.7:80")],
        [(":status", "200")],
    ],
    ids=["uppercase", "hop-by-hop", "pseudo-after-regular", "duplicate-pseudo", "status"],
)
async def test_inbound_validation_still_rejects_a_bad_block_after_good_ones(
    bad: list[tuple[str, str]],
) -> None:
    """Good CONNECTs first (their validation remembered), then a bad block on the fast
    path: h2's validation rejects it (GOAWAY PROTOCOL_ERROR), no handler runs for it. The
    last case is a block h2 accepts as a response (the client side of this process has
    remembered it) but not as a request."""
    handled: list[int] = []

    async def record(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        handled.append(stream.stream_id)
        await stream.accept()

    pair = Pair(record, split=100_000)
    await pair.exchange(lambda: pair.server._preface_done)
    h2_received = _count_received_headers(pair.server._h2)
    for sid in (1, 3):
        pair.client.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.7:80")])
    await pair.exchange(lambda: len(handled) == 2)
    responder = ClientPair()  # a response with :status, validated on a client: remembered
    await responder.run(lambda: responder.client._preface_done)
    opening = asyncio.ensure_future(responder.client.open_stream("10.0.0.7:80"))
    await responder.run(opening.done)

    pair.server.data_received(_raw_headers(pair, 5, bad))
    for _ in range(5):
        await asyncio.sleep(0)
    events = pair.client.receive_data(bytes(pair.transport.output))
    goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways and goaways[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert handled == [1, 3]
    assert not h2_received, "h2's HEADERS frame handling ran: the fast path was not taken"


async def test_headers_on_a_stream_we_reset_get_rst_stream_not_a_connection_error() -> None:
    """A peer's HEADERS crossing our RST_STREAM is h2's stream error (RST_STREAM
    STREAM_CLOSED), not a connection error: the fast path leaves closed streams to h2. The
    connection then serves a new stream as before."""
    handled: list[int] = []

    async def reset_first(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        handled.append(stream.stream_id)
        if stream.stream_id == 1:
            stream.reset(ErrorCodes.CANCEL)
            return
        await stream.accept()

    pair = Pair(reset_first, split=100_000)
    await pair.exchange(lambda: pair.server._preface_done)
    h2_received = _count_received_headers(pair.server._h2)
    connect = [(":method", "CONNECT"), (":authority", "10.0.0.7:80")]
    pair.client.send_headers(1, connect)
    await pair.exchange(lambda: any(isinstance(e, h2.events.StreamReset) for e in pair.events))
    # Trailers on stream 1, as if sent before the client saw our reset; h2 decodes them
    # (HPACK state) before it finds the stream closed.
    pair.server.data_received(_raw_headers(pair, 1, [("x-late", "1")], end_stream=True))
    await asyncio.sleep(0)
    answer = _frames(bytes(pair.transport.output))
    pair.transport.output = bytearray()
    assert [(type(f), f.stream_id) for f in answer] == [(RstStreamFrame, 1)]
    assert isinstance(answer[0], RstStreamFrame)
    assert answer[0].error_code == ErrorCodes.STREAM_CLOSED
    assert not pair.server._closing
    pair.client.send_headers(3, connect)
    await pair.exchange(lambda: any(isinstance(e, h2.events.ResponseReceived) for e in pair.events))
    assert handled == [1, 3]
    assert h2_received == [1], "only the HEADERS on the closed stream are h2's"


def test_validation_results_are_remembered_only_for_hbone_connections() -> None:
    """The memo serves `h2fast.Config` connections; any other h2 user validates itself."""
    block = [(":method", "CONNECT"), (":authority", "192.0.2.1:1")]

    def receive(config: h2.config.H2Configuration) -> list[Any]:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        server = h2.connection.H2Connection(config)
        client.initiate_connection()
        server.initiate_connection()
        server.receive_data(client.data_to_send())
        client.send_headers(1, block)
        events = server.receive_data(client.data_to_send())
        request = next(e for e in events if isinstance(e, h2.events.RequestReceived))
        assert request.headers is not None
        return list(request.headers)

    h2fast._VALIDATED.clear()
    assert receive(h2.config.H2Configuration(client_side=False)) == [
        (b":method", b"CONNECT"),
        (b":authority", b"192.0.2.1:1"),
    ]
    assert not h2fast._VALIDATED
    config = h2fast.Config(client_side=False, header_encoding="utf-8")
    first, second = receive(config), receive(config)
    assert first == second == block
    assert first is not second
    assert len(h2fast._VALIDATED) == 1


def test_a_never_indexed_field_keeps_its_type_and_is_not_remembered() -> None:
    config = h2fast.Config(client_side=False, header_encoding="utf-8")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(config)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    h2fast._VALIDATED.clear()
    secret = hpack.NeverIndexedHeaderTuple("x-secret", "s")
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "192.0.2.1:1"), secret])
    events = server.receive_data(client.data_to_send())
    request = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert request.headers is not None
    assert isinstance(request.headers[2], hpack.NeverIndexedHeaderTuple)
    assert not h2fast._VALIDATED


def test_too_many_streams_is_h2s_error_on_the_fast_path() -> None:
    """The concurrent-stream check h2 makes before opening a stream is made here too."""
    conn = h2.connection.H2Connection(
        h2fast.Config(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    conn.initiate_connection()
    conn.remote_settings = h2.settings.Settings(
        client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1}
    )
    connect = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.7:80")]
    assert h2fast.send_headers(conn, 1, connect, False)
    with pytest.raises(h2.exceptions.TooManyStreamsError):
        h2fast.send_headers(conn, 3, connect, False)
    assert 3 not in conn.streams


def test_informational_responses_and_trailers_are_left_to_h2() -> None:
    """A 1xx answer is another stream input for h2 (the final response still follows),
    and a second block on a stream is trailers: the fast path changes nothing for either."""
    config = h2fast.Config(
        client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False
    )
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(config)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "192.0.2.1:1")])
    server.receive_data(client.data_to_send())
    server.data_to_send()
    assert not h2fast.send_headers(server, 1, [(b":status", b"103")], False)
    assert not server.streams[1].state_machine.headers_sent
    assert not server.data_to_send()
    assert h2fast.send_headers(server, 1, [(b":status", b"200")], False)
    assert not h2fast.send_headers(server, 1, [(b"x-trailer", b"1")], True)
    assert server.streams[1].state_machine.state is StreamState.OPEN
