"""The DATA/WINDOW_UPDATE fast path (mesh/hbone/h2fast.py) against an independent h2 peer.

The server protocol runs over an in-memory transport; the client is a plain h2
`H2Connection`, which checks every frame the server sends (framing, windows, stream
states). Bytes to the server are cut at awkward boundaries so frames and their headers
span reads. Both peers' flow-control accounting must agree afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import h2.stream
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, RstStreamFrame

from mesh.hbone import h2fast
from mesh.hbone.connection import HboneServerProtocol, HboneStream
from mesh.hbone.limits import HboneLimits
from mesh.hbone.protocol import ConnectRequest
from mesh.spiffe import SpiffeId
from tests.unit.hbone_rig import echo, make_pki

LIMITS = HboneLimits(stream_window=16384, connection_window=65535, max_frame_size=16384)
CLIENT_DER = x509.load_pem_x509_certificate(make_pki().client.cert_chain_pem).public_bytes(
    Encoding.DER
)
CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.7:80")]


class _Tls:
    def selected_alpn_protocol(self) -> str:
        return "h2"

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return CLIENT_DER


class MemoryTransport(asyncio.Transport):
    """Collects what the protocol writes; its peer reads all of it at once."""

    def __init__(self) -> None:
        super().__init__()
        self.output = bytearray()
        self.writes = 0
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"ssl_object": _Tls(), "peername": ("198.19.1.10", 40000)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.output += data
        self.writes += 1

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class Pair:
    """Our server protocol and an h2 client, bytes moved between them by `exchange`."""

    def __init__(self, handler: Callable[..., Any] = echo, split: int = 7) -> None:
        self.server = HboneServerProtocol(handler, limits=LIMITS)
        self.transport = MemoryTransport()
        self.server.connection_made(self.transport)
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        # A stream window below the connection's, so that each one binds somewhere.
        self.client.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 20000}
        )
        self.client.initiate_connection()
        self.split = split
        self.events: list[h2.events.Event] = []
        self.received: dict[int, bytearray] = {}

    def feed(self, data: bytes) -> None:
        for at in range(0, len(data), self.split):
            self.server.data_received(data[at : at + self.split])

    async def exchange(self, until: Callable[[], bool], rounds: int = 2000) -> None:
        for _ in range(rounds):
            self.feed(self.client.data_to_send())
            await asyncio.sleep(0)
            output, self.transport.output = bytes(self.transport.output), bytearray()
            for event in self.client.receive_data(output):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    assert event.stream_id is not None and event.data is not None
                    self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
                    self.client.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            if until():
                return
        raise AssertionError("the exchange did not finish")

    def ended(self, stream_id: int) -> bool:
        return any(
            isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id for e in self.events
        )

    def windows_agree(self, stream_id: int) -> None:
        """Each side's send window is exactly what the other thinks it granted."""
        self.feed(self.client.data_to_send())  # the client's last WINDOW_UPDATEs
        ours, theirs = self.server._h2, self.client
        assert ours.local_flow_control_window(stream_id) == theirs.remote_flow_control_window(
            stream_id
        )
        assert ours.remote_flow_control_window(stream_id) == theirs.local_flow_control_window(
            stream_id
        )
        assert ours.outbound_flow_control_window == theirs.inbound_flow_control_window
        assert ours.inbound_flow_control_window == theirs.outbound_flow_control_window
        mine, peers = ours.streams[stream_id], theirs.streams[stream_id]
        assert mine.outbound_flow_control_window == peers.inbound_flow_control_window
        assert mine.inbound_flow_control_window == peers.outbound_flow_control_window


def _count(monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(obj, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, counting)
    return calls


def test_the_installed_h2_has_what_the_fast_path_uses() -> None:
    assert h2fast.SUPPORTED


@pytest.mark.parametrize("split", [1, 7, 16393, 100_000])
async def test_echo_through_the_fast_path_keeps_bytes_windows_and_half_close(
    monkeypatch: pytest.MonkeyPatch, split: int
) -> None:
    """Several windows' worth each way, in chunks small and frame-sized, cut into reads of
    `split` bytes: every byte arrives in order, END_STREAM comes after the last one, the
    windows of both peers agree, both h2s close the stream, and h2 parsed or built none of
    the DATA frames (END_STREAM included)."""
    pair = Pair(split=split)
    h2_received = _count(monkeypatch, pair.server, "_on_data")
    h2_sent = _count(monkeypatch, pair.server._h2, "send_data")
    h2_ended = _count(monkeypatch, pair.server._h2, "end_stream")
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, CONNECT)
    await pair.exchange(lambda: any(isinstance(e, h2.events.ResponseReceived) for e in pair.events))
    payload = bytes(i % 251 for i in range(200_000))
    sent = 0
    sizes = iter([1, 5, 100, 16384, 3000, 16384, 16384] * 100)
    for _ in range(10_000):
        if sent == len(payload):
            break
        window = pair.client.local_flow_control_window(sid)
        if window:
            size = min(next(sizes), window, len(payload) - sent)
            pair.client.send_data(sid, payload[sent : sent + size])
            sent += size
        await pair.exchange(lambda: True)
    assert sent == len(payload), "the server stopped opening the window"
    await pair.exchange(lambda: len(pair.received.get(sid, b"")) == len(payload))
    pair.windows_agree(sid)
    pair.client.end_stream(sid)
    await pair.exchange(lambda: pair.ended(sid))
    assert bytes(pair.received[sid]) == payload
    assert pair.server._h2.streams[sid].closed and pair.client.streams[sid].closed
    assert not h2_received
    assert not h2_sent
    assert not h2_ended


@pytest.mark.parametrize("split", [1, 5, 100_000])
async def test_end_stream_on_a_data_frame_comes_after_its_payload(split: int) -> None:
    """DATA with END_STREAM, its payload cut over several reads: the reader gets every byte,
    then EOF; the server's h2 sees the stream half-closed by the peer, as h2 itself would."""
    got: list[bytes] = []
    ended: list[h2.stream.StreamState] = []

    async def reader(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        await stream.accept()
        while data := await stream.read():
            got.append(data)
        ended.append(pair.server._h2.streams[stream.stream_id].state_machine.state)

    pair = Pair(reader, split=split)
    pair.client.send_headers(1, CONNECT)
    await pair.exchange(lambda: any(isinstance(e, h2.events.ResponseReceived) for e in pair.events))
    pair.client.send_data(1, b"last words", end_stream=True)
    await pair.exchange(lambda: bool(ended))
    assert b"".join(got) == b"last words"
    assert ended == [h2.stream.StreamState.HALF_CLOSED_REMOTE]


async def test_data_after_the_peers_reset_in_the_same_read_is_not_delivered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The frames ahead of a DATA frame reach h2 first, so a RST_STREAM read together with
    later DATA for that stream closes it before the fast path could take the DATA."""
    failed: list[BaseException] = []

    async def reader(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        await stream.accept()
        try:
            while await stream.read():
                pass
        except ConnectionResetError as exc:
            failed.append(exc)

    pair = Pair(reader, split=100_000)
    pair.client.send_headers(1, CONNECT)
    await pair.exchange(lambda: any(isinstance(e, h2.events.ResponseReceived) for e in pair.events))
    delivered: list[bytes] = []
    original = pair.server._data_arrived

    def recording(stream: HboneStream, data: bytes) -> None:
        delivered.append(data)
        original(stream, data)

    monkeypatch.setattr(pair.server, "_data_arrived", recording)
    first, later = DataFrame(1, b"before"), DataFrame(1, b"after")
    pair.server.data_received(first.serialize() + RstStreamFrame(1).serialize() + later.serialize())
    for _ in range(5):
        await asyncio.sleep(0)
    assert delivered == [b"before"]
    assert failed


async def test_data_inside_a_header_block_is_a_protocol_error() -> None:
    """Only CONTINUATION may follow HEADERS without END_HEADERS (RFC 9113 §6.10): DATA for
    another, open stream there is h2's connection error, not data for that stream."""
    got: list[bytes] = []

    async def reader(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        await stream.accept()
        while data := await stream.read():
            got.append(data)

    pair = Pair(reader, split=100_000)
    pair.client.send_headers(1, CONNECT)
    await pair.exchange(lambda: any(isinstance(e, h2.events.ResponseReceived) for e in pair.events))
    block = pair.client.encoder.encode(CONNECT)
    pair.server.data_received(
        HeadersFrame(3, block[:2]).serialize()
        + DataFrame(1, b"smuggled").serialize()
        + ContinuationFrame(3, block[2:], flags=["END_HEADERS"]).serialize()
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert got == []
    events = pair.client.receive_data(bytes(pair.transport.output))
    goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways and goaways[0].error_code == ErrorCodes.PROTOCOL_ERROR


async def test_frames_of_one_iteration_go_out_in_order_in_one_write() -> None:
    """Small and frame-sized DATA of several streams, written in one loop iteration, are
    one transport write (plus the large payloads as their own pieces) in stream order."""
    pair = Pair(split=100_000)
    for sid in (1, 3):
        pair.client.send_headers(sid, CONNECT)
    await pair.exchange(lambda: not pair.transport.output and len(pair.server._streams) == 2)
    streams = list(pair.server._streams.values())
    big = b"B" * 16384
    pair.transport.writes = 0
    for stream in streams:
        stream.write(b"small")
        stream.write(big)
        stream.write(b"tail")
        stream.write_eof()
    await asyncio.sleep(0)
    # Per stream: header+small+header into the tail, the big payload alone; then the rest.
    assert pair.transport.writes == 5
    await pair.exchange(lambda: pair.ended(1) and pair.ended(3))
    for sid in (1, 3):
        assert bytes(pair.received[sid]) == b"small" + big + b"tail"


async def test_writes_while_the_transport_is_paused_wait_and_keep_their_order() -> None:
    """A write with nothing queued goes out at once as a DATA frame, but not while the
    transport has paused writing: then it is queued, and after resume_writing everything
    written meanwhile follows in order, the windows agreeing."""
    pair = Pair(split=100_000)
    pair.client.send_headers(1, CONNECT)
    await pair.exchange(lambda: len(pair.server._streams) == 1)
    await pair.exchange(lambda: any(isinstance(e, h2.events.ResponseReceived) for e in pair.events))
    (stream,) = pair.server._streams.values()
    stream.write(b"first ")
    await pair.exchange(lambda: bytes(pair.received.get(1, b"")) == b"first ")
    pair.server.pause_writing()
    stream.write(b"second ")
    stream.write(b"third")
    await asyncio.sleep(0)
    assert not pair.transport.output
    pair.server.resume_writing()
    await pair.exchange(lambda: bytes(pair.received.get(1, b"")) == b"first second third")
    pair.windows_agree(1)
