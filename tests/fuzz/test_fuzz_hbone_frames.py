"""Fuzz target: the HBONE server's HTTP/2 frame handling (`HboneServerProtocol`).

Feeds a server protocol, through its asyncio.Protocol interface, the client preface and
then a generated sequence of frames: HEADERS (CONNECT requests good and bad, random header
lists, header blocks split over CONTINUATION), DATA, RST_STREAM, SETTINGS, WINDOW_UPDATE,
PING, GOAWAY, PRIORITY, PUSH_PROMISE, stray CONTINUATION, frames of unknown or known types
with random flags, stream ids and payloads, and raw garbage; all cut into chunks at random
boundaries, with a peer that reads the server's output only now and then.

Properties: no exception escapes `data_received` / `connection_lost` or reaches the loop;
the handler sees only valid CONNECT requests from the certificate's identity; nothing is
logged as an error; after every chunk the server holds no more than its `HboneLimits` allow
(streams, unread bytes per stream and connection, h2's frame and header-block buffers, its
write buffer while it still reads); its output parses as HTTP/2 frames; at the end it
either still answers a PING or has closed the connection; every handler ends once the
connection is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hpack
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from mesh.hbone.connection import HboneServerProtocol, HboneStream
from mesh.hbone.limits import HboneLimits
from mesh.hbone.protocol import ConnectRequest, parse_connect_request
from mesh.spiffe import SpiffeId
from tests.fuzz.profiles import examples
from tests.unit.hbone_rig import CLIENT_ID, PREFACE, frame_header, make_pki

TIMEOUT = 2.0
# Small, so that generated inputs reach every bound (valid per HboneLimits' own checks).
LIMITS = HboneLimits(
    stream_window=4096,
    connection_window=65535,  # the RFC's initial window: no WINDOW_UPDATE at all
    max_frame_size=16384,
    max_header_list_size=1024,
    max_concurrent_streams=3,
    stream_send_buffer=4096,
    write_high_water=2048,
    write_buffer_limit=20000,
)
_PING = b"fuzzping"
CLIENT_DER = x509.load_pem_x509_certificate(make_pki().client.cert_chain_pem).public_bytes(
    Encoding.DER
)


class TlsSession:
    """The one stand-in: what `connection_made` asks of the TLS layer (ALPN, the peer's
    certificate). Frames are fuzzed without TLS so that thousands of inputs take seconds;
    the certificate is a real mesh leaf read by the real `peer_identity`, and TLS itself
    is fuzzed by the record-level target (test_fuzz_hbone_tls.py)."""

    def selected_alpn_protocol(self) -> str:
        return "h2"

    def getpeercert(self, binary_form: bool = False) -> dict[str, object] | bytes:
        # As an SSLObject's for a peer it did not verify: nothing decoded, the DER on request.
        return CLIENT_DER if binary_form else {}


class PeerTransport(asyncio.Transport):
    """In memory, with a peer that reads the server's output only when told (`peer_reads`):
    pauses and resumes the protocol's writing at the water marks, as asyncio's transports
    do, and reports a close to the protocol on the next loop iteration."""

    def __init__(self, protocol: HboneServerProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.output = bytearray()
        self.unread = 0
        self.high, self.low = 65536, 16384
        self.reading = True
        self.writing_paused = False
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        extra = {"ssl_object": TlsSession(), "peername": ("198.19.1.10", 40000)}
        return extra.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 65536 if high is None else high
        self.low = self.high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self.unread

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "write after close"
        self.output += data
        self.unread += len(data)
        if not self.writing_paused and self.unread > self.high:
            self.writing_paused = True
            self.protocol.pause_writing()

    def peer_reads(self) -> None:
        self.unread = 0
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()


# --- what the client sends -----------------------------------------------------------------

_stream_ids = st.sampled_from([1, 3, 5, 7, 9, 11, 2, 4, 2**31 - 1])
_any_stream_ids = st.one_of(_stream_ids, st.just(0), st.integers(0, 2**32 - 1))
_texts = st.text(max_size=24)
_authorities = st.one_of(
    st.sampled_from(
        [
            "10.0.0.7:80",
            "[fd00::7]:8080",
            "10.0.0.7:0",
            "10.0.0.7:65536",
            "10.0.0.7:08080",
            "10.0.0.7",
            ":80",
            "[10.0.0.7]:80",
            "fd00::7:80",
            "server.demo:80",
            "10.0.0.7:+80",
            "10.0.0.7:٨٠",
            "",
        ]
    ),
    _texts,
)
_header_names = st.one_of(
    st.sampled_from(
        [
            ":method",
            ":authority",
            ":path",
            ":scheme",
            ":protocol",
            ":status",
            "baggage",
            "x-forwarded-for",
            "connection",
            "te",
            "Upper",
            "host",
            "",
        ]
    ),
    _texts,
)
_header_values = st.one_of(
    st.sampled_from(["CONNECT", "GET", "trailers", "a\r\nb", "nul\0", " padded "]), _texts
)
_extra_headers = st.lists(st.tuples(_header_names, _header_values), max_size=4)


@st.composite
def _header_lists(draw: st.DrawFn) -> tuple[tuple[str, str], ...]:
    if draw(st.booleans()):
        headers = [(":method", "CONNECT"), (":authority", draw(_authorities))]
        headers += draw(_extra_headers)
        if draw(st.booleans()):
            headers = draw(st.permutations(headers))
    else:
        headers = draw(_extra_headers)
    return tuple(headers)


@dataclass(frozen=True)
class Raw:
    """Bytes sent as they are; `aligned` if they end on a frame boundary."""

    data: bytes
    aligned: bool = True

    def render(self, encoder: hpack.Encoder) -> bytes:
        return self.data


@dataclass(frozen=True)
class Headers:
    """A request header block, HPACK-encoded at send time (the encoder has state), split
    into HEADERS and `fragments - 1` CONTINUATION frames."""

    stream_id: int
    headers: tuple[tuple[str, str], ...]
    end_stream: bool
    fragments: int
    end_headers: bool = True
    aligned: bool = field(default=True, init=False)

    def render(self, encoder: hpack.Encoder) -> bytes:
        block = encoder.encode(list(self.headers))
        step = -(-len(block) // self.fragments) or 1
        pieces = [block[i : i + step] for i in range(0, len(block), step)] or [b""]
        frames: list[Frame] = [
            HeadersFrame(self.stream_id, pieces[0], flags=["END_STREAM"] * self.end_stream)
        ]
        frames += [ContinuationFrame(self.stream_id, piece) for piece in pieces[1:]]
        if self.end_headers:
            frames[-1].flags.add("END_HEADERS")
        return b"".join(f.serialize() for f in frames)


def _frame(frame: Frame) -> Raw:
    return Raw(frame.serialize())


_flags = st.integers(0, 255)
_u31 = st.integers(0, 2**31 - 1)
_u32 = st.integers(0, 2**32 - 1)
_payloads = st.binary(max_size=64)
_settings = st.dictionaries(
    st.one_of(st.integers(1, 6), st.integers(0, 2**16 - 1)), _u32, max_size=4
)

_sends: st.SearchStrategy[Raw | Headers] = st.one_of(
    st.builds(
        Headers,
        _stream_ids,
        _header_lists(),
        st.booleans(),
        st.integers(1, 3),
        st.sampled_from([True, True, True, False]),  # mostly complete blocks
    ),
    st.builds(
        lambda sid, data, end, pad: _frame(
            DataFrame(
                sid, data, flags=["END_STREAM"] * end + ["PADDED"] * (pad > 0), pad_length=pad
            )
        ),
        _stream_ids,
        st.one_of(_payloads, st.integers(0, 5000).map(lambda n: b"d" * n)),
        st.booleans(),
        st.integers(0, 20),
    ),
    st.builds(
        lambda sid, code: _frame(RstStreamFrame(sid, code)),
        _stream_ids,
        st.one_of(st.sampled_from(list(ErrorCodes)), _u32),
    ),
    st.builds(lambda s: _frame(SettingsFrame(0, s)), _settings),
    st.just(_frame(SettingsFrame(0, flags=["ACK"]))),
    st.builds(
        lambda sid, inc: Raw(frame_header(4, 0x8, 0, sid) + inc.to_bytes(4, "big")),
        st.one_of(st.just(0), _stream_ids),
        st.one_of(st.just(0), st.integers(1, 2**31 - 1)),
    ),
    st.builds(lambda sid, inc: _frame(WindowUpdateFrame(sid, inc)), _stream_ids, _u31),
    st.builds(
        lambda data, ack: _frame(PingFrame(0, data, flags=["ACK"] * ack)),
        st.binary(min_size=8, max_size=8),
        st.booleans(),
    ),
    st.builds(
        lambda last, code, data: _frame(GoAwayFrame(0, last, code, data)),
        st.one_of(st.just(0), _stream_ids),
        _u32,
        _payloads,
    ),
    st.builds(
        lambda sid, dep, weight, ex: _frame(PriorityFrame(sid, dep, weight, ex)),
        _stream_ids,
        _u31,
        st.integers(0, 255),
        st.booleans(),
    ),
    st.builds(
        lambda sid, promised, data: _frame(PushPromiseFrame(sid, promised, data)),
        _stream_ids,
        _stream_ids,
        _payloads,
    ),
    st.builds(
        lambda sid, data, end: _frame(ContinuationFrame(sid, data, flags=["END_HEADERS"] * end)),
        _stream_ids,
        _payloads,
        st.booleans(),
    ),
    # Any type (known ones with malformed payloads, unknown ones), flags and stream id.
    st.builds(
        lambda kind, flags, sid, data: Raw(frame_header(len(data), kind, flags, sid) + data),
        # Not RST_STREAM (3) nor GOAWAY (7): see above.
        st.one_of(st.integers(0, 10), st.integers(0, 255)).filter(lambda kind: kind not in (3, 7)),
        _flags,
        _any_stream_ids,
        _payloads,
    ),
    # A header that announces more than follows, or garbage.
    st.builds(lambda data: Raw(data, aligned=False), st.binary(min_size=1, max_size=32)),
)


@dataclass(frozen=True)
class Plan:
    sends: list[Raw | Headers]
    chunk_sizes: list[int]  # cycled
    peer_reads_every: int  # chunks
    handler: str

    def render(self) -> tuple[bytes, bool]:
        encoder = hpack.Encoder()
        data = PREFACE + b"".join(s.render(encoder) for s in self.sends)
        return data, all(s.aligned for s in self.sends)

    def chunks(self, data: bytes) -> Iterator[bytes]:
        pos = 0
        for size in itertools.cycle(self.chunk_sizes):
            if pos >= len(data):
                return
            yield data[pos : pos + size]
            pos += size


# Valid CONNECTs first (streams 1, 3, 5), so that most inputs reach the handlers before
# a broken frame ends the connection.
_openings = st.integers(0, 3).map(
    lambda n: [
        Headers(sid, ((":method", "CONNECT"), (":authority", f"10.0.0.{sid}:80")), False, 1)
        for sid in (1, 3, 5)[:n]
    ]
)
_plans = st.builds(
    Plan,
    st.tuples(_openings, st.lists(_sends, max_size=8)).map(lambda t: t[0] + t[1]),
    st.lists(st.one_of(st.integers(1, 16), st.integers(1, 4096)), min_size=1, max_size=6),
    st.integers(1, 8),
    st.sampled_from(["echo", "refuse", "stall"]),
)


# --- the server under test -----------------------------------------------------------------


class Recorder(logging.Handler):
    """Collects error records from mesh.hbone: a handler failing or an unexpected error."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Handlers:
    """The stream handlers ztunnel could be: echo, refuse with 403, accept and never read."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.problems: list[str] = []
        self.calls = 0

    async def __call__(self, stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        self.calls += 1
        self.check(request, peer)
        if self.kind == "refuse":
            stream.refuse(403)
            return
        await stream.accept()
        if self.kind == "stall":  # a slow upstream: the windows must hold the peer back
            while not stream.is_closed:
                await asyncio.sleep(0.001)
            return
        while data := await stream.read(1000):
            stream.write(data)
            await stream.drain()
        stream.write_eof()
        await stream.drain()

    def check(self, request: ConnectRequest, peer: SpiffeId) -> None:
        headers = [(":method", "CONNECT"), (":authority", request.authority), *request.headers]
        if parse_connect_request(headers) != request:
            self.problems.append(f"handler got an invalid request: {request}")
        if peer != CLIENT_ID:
            self.problems.append(f"handler got peer {peer}, expected {CLIENT_ID}")


def check_bounds(protocol: HboneServerProtocol, transport: PeerTransport) -> None:
    streams = list(protocol._streams.values())
    assert len(streams) <= LIMITS.max_concurrent_streams
    unread = [sum(map(len, s._recv)) for s in streams]
    assert all(n <= LIMITS.stream_window for n in unread), unread
    assert sum(unread) <= LIMITS.connection_window
    buffer = protocol._h2.incoming_buffer
    assert len(buffer._data) <= 9 + LIMITS.max_frame_size
    assert sum(len(f.data) for f in buffer._headers_buffer) <= LIMITS.max_header_list_size
    # It stops reading a peer that does not read what it is made to answer.
    assert not transport.reading or transport.unread <= LIMITS.write_buffer_limit


def server_frames(output: bytes) -> list[Frame]:
    """The server's output as frames; fails if it is not well-formed HTTP/2."""
    frames, view = [], memoryview(output)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        assert len(view) >= 9 + length, "server output ends inside a frame"
        frames.append(frame)
        view = view[9 + length :]
    return frames


async def tick() -> None:
    for _ in range(4):
        await asyncio.sleep(0)


async def serve(plan: Plan) -> list[str]:
    """Runs `plan` against a server; returns the problems found."""
    handlers = Handlers(plan.handler)
    protocol = HboneServerProtocol(handlers, limits=LIMITS)
    transport = PeerTransport(protocol)
    protocol.connection_made(transport)
    data, aligned = plan.render()
    for index, chunk in enumerate(plan.chunks(data)):
        if transport.closing:
            break
        if not transport.reading or index % plan.peer_reads_every == 0:
            transport.peer_reads()  # a real transport delivers nothing while paused
        protocol.data_received(chunk)
        if not transport.closing:
            check_bounds(protocol, transport)
        await tick()
    if aligned and not transport.closing:
        transport.peer_reads()
        protocol.data_received(PingFrame(0, _PING).serialize())
        await tick()
        pongs = [
            f for f in server_frames(bytes(transport.output))
            if isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == _PING
        ]  # fmt: skip
        assert pongs or transport.closing, "the server neither answers a PING nor closes"
    server_frames(bytes(transport.output))
    # --hypothesis-show-statistics tells how often inputs got this far.
    event("server closed the connection" if transport.closing else "server still serving")
    event(f"handler calls: {min(handlers.calls, 3)}{'+' if handlers.calls >= 3 else ''}")
    if not transport.closing:  # the peer hangs up
        transport.closing = True
        protocol.connection_lost(ConnectionResetError("peer went away"))
    async with asyncio.timeout(TIMEOUT):
        while protocol._tasks:
            await asyncio.sleep(0.001)
    return handlers.problems


@settings(max_examples=examples(2.0))
@given(_plans)
@example(  # DATA before the 200: the bytes must never reach the handler
    Plan(
        [
            Headers(1, ((":method", "CONNECT"), (":authority", "10.0.0.7:80")), False, 1),
            Raw(DataFrame(1, b"early").serialize()),
        ],
        [1000],
        1,
        "echo",
    )
)
@example(  # more streams than allowed, each unread
    Plan(
        [
            Headers(i, ((":method", "CONNECT"), (":authority", "10.0.0.7:80")), False, 1)
            for i in (1, 3, 5, 7, 9)
        ],
        [7],
        2,
        "stall",
    )
)
@example(  # a header block left open, then a PING
    Plan([Headers(1, ((":method", "CONNECT"),), False, 2, end_headers=False)], [9], 1, "echo")
)
def test_server_survives_any_frames(plan: Plan) -> None:
    reported: list[dict[str, Any]] = []
    recorder = Recorder()
    logger = logging.getLogger("mesh.hbone")
    logger.addHandler(recorder)

    async def main() -> list[str]:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        async with asyncio.timeout(4 * TIMEOUT):
            return await serve(plan)

    try:
        problems = asyncio.run(main())
    finally:
        logger.removeHandler(recorder)
    assert not problems, problems
    assert not reported, f"the loop reported errors: {reported}"
    assert not recorder.records, [r.getMessage() for r in recorder.records]
