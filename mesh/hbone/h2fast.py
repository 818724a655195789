"""DATA, WINDOW_UPDATE and HEADERS frames without h2's per-frame objects; h2 keeps the state.

h2 builds a hyperframe object (with a `Flags` set, a state-machine pass and an event) for
every DATA frame sent or received and every WINDOW_UPDATE: a third of a ztunnel's CPU per
relayed request (docs/performance.md). Here the frame bytes of plain DATA frames are built
and parsed directly, while the numbers h2 decides with stay h2's: a frame takes this path
only where h2 would accept it without a state change or an event besides the data (an
open stream, a steady connection, the window large enough), and its bytes are subtracted
from the same window counters h2 keeps; when to send a WINDOW_UPDATE is still h2's
`WindowManager`. Anything else (END_STREAM, padding, a frame inside a header block, a
closed stream, a window overrun) goes through h2 unchanged, which raises the same errors
as before.

HEADERS (a tunnel's CONNECT and its answer, a fifth of a new connection's CPU) take the
same terms: the frame is built or parsed here, everything else is h2's own code in h2's
order: the concurrent-stream check, the connection's and the stream's state machines,
h2's stream objects, its HPACK encoder and decoder, and on receive its validation and
normalization of the header block and its events. Padding, priority, CONTINUATION, a
stream h2 would answer with RST_STREAM or a connection error go through h2 unchanged.

h2's validation and normalization of a received header block is a pure function of the
block, the stream's validation flags and the configuration; on connections configured
with `Config` its results are remembered for recently seen blocks (h2's
`_process_received_headers`, on every path), so a tunnel to a destination seen before
skips re-running it. HBONE blocks repeat (`CONNECT` to a few `ip:port`s, `200`); other
h2 users (the waypoint's HTTP/2 to apps) keep plain h2. Errors are not remembered: a bad
block is checked, and rejected, every time.

The path touches h2 attributes that are not public API, so `SUPPORTED` checks them once
against the installed h2 (a 4.x) and everything goes through h2 when one is missing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.stream
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState
from h2.stream import StreamInputs, StreamState
from h2.utilities import (
    HeaderValidationFlags,
    authority_from_headers,
    extract_method_header,
    is_informational_response,
)
from hpack import HeaderTuple

FRAME_HEADER = 9
DATA = 0x0
HEADERS = 0x1
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9
END_STREAM = 0x1
END_HEADERS = 0x4
# length (24 bits) and type in one 32-bit field, then flags and stream id.
_HEADER = struct.Struct(">IBI")
# A frame header at an offset: (length << 8 | type, flags, stream id with its reserved bit).
parse_frame_header = _HEADER.unpack_from
STREAM_ID_MASK = 0x7FFFFFFF
_WINDOW_UPDATE = struct.Struct(">IBII")

_CAN_SEND = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})
_CAN_RECEIVE = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})
_CLOSED = ConnectionState.CLOSED


def _supported() -> bool:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "CONNECT"), (":authority", "127.0.0.1:1")])
    stream = conn.streams.get(1)
    return (
        isinstance(conn._data_to_send, bytearray)
        and hasattr(conn._inbound_flow_control_window_manager, "current_window_size")
        and isinstance(conn.outbound_flow_control_window, int)
        and isinstance(stream, h2.stream.H2Stream)
        and hasattr(stream._inbound_window_manager, "current_window_size")
        and isinstance(stream.outbound_flow_control_window, int)
        and hasattr(stream.state_machine, "headers_received")
        and hasattr(stream, "_expected_content_length")
        and hasattr(stream, "_actual_content_length")
        and isinstance(conn.incoming_buffer._headers_buffer, list)
        and isinstance(conn.incoming_buffer._data, bytearray)
        and isinstance(conn.incoming_buffer._preamble_len, int)
        and callable(getattr(conn, "_get_or_create_stream", None))
        and callable(getattr(h2.connection, "_decode_headers", None))
        and callable(getattr(conn, "_terminate_connection", None))
        and hasattr(stream, "_authority")
        and hasattr(stream, "request_method")
        and hasattr(stream.state_machine, "headers_sent")
        and isinstance(conn._closed_streams, dict)
        and callable(getattr(stream, "_process_received_headers", None))
    )


SUPPORTED = _supported()


class Config(h2.config.H2Configuration):
    """h2's configuration, for connections whose received header blocks repeat: their
    validation results are remembered (see the module docstring)."""


# Validated header blocks, oldest first: (block, flags, encoding, normalize, validate) ->
# h2's result. Bounded in entries and in the size of a block (HBONE's are ~20-100 bytes),
# so it holds ~100 KiB at most; a peer sending ever new blocks only makes us validate each.
_VALIDATED: dict[Any, tuple[Any, ...]] = {}
_VALIDATED_MAX = 256
_VALIDATED_BLOCK = 256
_h2_process_received_headers = h2.stream.H2Stream._process_received_headers


def _process_received_headers(
    self: h2.stream.H2Stream,
    headers: Iterable[Any],
    header_validation_flags: HeaderValidationFlags,
    header_encoding: bool | str | None,
) -> list[Any]:
    """h2's `H2Stream._process_received_headers`, its result remembered per input. Only
    small blocks of plain `HeaderTuple`s (what HPACK decodes) are remembered: a
    never-indexed field's tuple type is part of h2's output. Connections with another
    configuration get h2's own."""
    config = self.config
    if type(config) is not Config or type(headers) is not list:
        return _h2_process_received_headers(self, headers, header_validation_flags, header_encoding)
    size = 0
    for header in headers:
        if type(header) is not HeaderTuple:
            return _h2_process_received_headers(
                self, headers, header_validation_flags, header_encoding
            )
        size += len(header[0]) + len(header[1])
    if size > _VALIDATED_BLOCK:
        return _h2_process_received_headers(self, headers, header_validation_flags, header_encoding)
    key = (
        tuple(headers),
        header_validation_flags,
        header_encoding,
        config.normalize_inbound_headers,
        config.validate_inbound_headers,
    )
    result = _VALIDATED.get(key)
    if result is None:
        result = tuple(
            _h2_process_received_headers(self, headers, header_validation_flags, header_encoding)
        )
        if len(_VALIDATED) >= _VALIDATED_MAX:
            del _VALIDATED[next(iter(_VALIDATED))]
        _VALIDATED[key] = result
    return list(result)


if SUPPORTED:
    h2.stream.H2Stream._process_received_headers = _process_received_headers  # type: ignore[method-assign]


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length << 8 | kind, flags, stream_id)


def take_output(conn: h2.connection.H2Connection) -> bytes | bytearray:
    """What h2 queued to send (the caller owns it now): `data_to_send()` without its copy."""
    if not SUPPORTED:
        return conn.data_to_send()
    data = conn._data_to_send
    if data:
        conn._data_to_send = bytearray()
    return data


def sendable(conn: h2.connection.H2Connection, stream_id: int) -> h2.stream.H2Stream | None:
    """h2's stream if it may send DATA: a frame without END_STREAM is a no-op for h2's
    state machines, END_STREAM goes through `end_stream_sent`."""
    if not SUPPORTED or conn.state_machine.state is _CLOSED:
        return None
    stream = conn.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in _CAN_SEND:
        return None
    return stream


def send_window(conn: h2.connection.H2Connection, stream: h2.stream.H2Stream) -> int:
    """`H2Connection.local_flow_control_window` for a stream from `sendable`."""
    return min(conn.outbound_flow_control_window, stream.outbound_flow_control_window)


def data_sent(conn: h2.connection.H2Connection, stream: h2.stream.H2Stream, size: int) -> bytes:
    """Account a DATA frame of `size` bytes (within `send_window`); its 9-byte header."""
    conn.outbound_flow_control_window -= size
    stream.outbound_flow_control_window -= size
    return _HEADER.pack(size << 8 | DATA, 0, stream.stream_id)


def receivable(
    conn: h2.connection.H2Connection, stream_id: int, size: int
) -> h2.stream.H2Stream | None:
    """h2's stream if h2 would accept a DATA frame (no flag but END_STREAM) of `size` bytes
    on it with nothing but its DataReceived (and StreamEnded) events; None leaves the frame
    to h2."""
    if not SUPPORTED or conn.state_machine.state is _CLOSED:
        return None
    buffer = conn.incoming_buffer
    # h2 in the middle of a header block (only CONTINUATION may follow) or holding bytes.
    if buffer._headers_buffer or buffer._data or buffer._preamble_len:
        return None
    stream = conn.streams.get(stream_id)
    if (
        stream is None
        or stream.state_machine.state not in _CAN_RECEIVE
        or not stream.state_machine.headers_received
        or stream._expected_content_length is not None
        or size > stream._inbound_window_manager.current_window_size
        or size > conn._inbound_flow_control_window_manager.current_window_size
    ):
        return None
    return stream


def data_received(
    conn: h2.connection.H2Connection, stream: h2.stream.H2Stream, size: int, end_stream: bool
) -> None:
    """Account a DATA frame `receivable` accepted, as h2's receive path does; its
    END_STREAM is h2's own state transition (half-closed or closed, with the closed-by
    record h2 keeps)."""
    conn._inbound_flow_control_window_manager.current_window_size -= size
    stream._inbound_window_manager.current_window_size -= size
    stream._actual_content_length += size
    if end_stream:
        stream.state_machine.process_input(StreamInputs.RECV_END_STREAM)


def end_stream_sent(stream: h2.stream.H2Stream) -> bytes:
    """`H2Connection.end_stream` for a stream from `sendable`: h2's state transition, and
    the empty DATA frame with END_STREAM to send."""
    stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
    return _HEADER.pack(DATA, END_STREAM, stream.stream_id)


def acknowledge(conn: h2.connection.H2Connection, stream_id: int, size: int) -> bytes:
    """`H2Connection.acknowledge_received_data`, returning the WINDOW_UPDATE frames (maybe
    none) instead of queueing them; h2's window managers decide when and how much."""
    out = b""
    increment = conn._inbound_flow_control_window_manager.process_bytes(size)
    if increment:
        out = _WINDOW_UPDATE.pack(4 << 8 | WINDOW_UPDATE, 0, 0, increment)
    stream = conn.streams.get(stream_id)
    if stream is not None and stream.open:
        increment = stream._inbound_window_manager.process_bytes(size)
        if increment:
            out += _WINDOW_UPDATE.pack(4 << 8 | WINDOW_UPDATE, 0, stream_id, increment)
    return out


def send_headers(
    conn: h2.connection.H2Connection,
    stream_id: int,
    headers: Sequence[tuple[bytes, bytes]],
    end_stream: bool,
) -> bool:
    """`H2Connection.send_headers` for a stream's first header block (a request, or a final
    response), the frames appended to h2's output; False (nothing changed) leaves it to h2.

    h2's own steps, in its order: the concurrent-stream check, the connection's and the
    stream's state machines, its stream object, HPACK with its encoder (whose state the
    peer's decoder follows), the authority and method h2 records. Skipped: the frame
    objects, and outbound validation and normalization, which this connection turns off
    anyway (its header blocks are built and checked by mesh.hbone.protocol)."""
    if not SUPPORTED:
        return False
    config = conn.config
    if config.validate_outbound_headers or config.normalize_outbound_headers:
        return False
    stream = conn.streams.get(stream_id)
    if stream is not None and stream.state_machine.headers_sent:
        return False  # trailers
    client_side = config.client_side
    if not client_side and is_informational_response(headers):
        return False  # another stream input
    if stream is None:
        limit = conn.remote_settings.max_concurrent_streams
        if conn.open_outbound_streams + 1 > limit:
            raise h2.exceptions.TooManyStreamsError(f"Max outbound streams is {limit}")
    conn.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
    stream = conn._get_or_create_stream(
        stream_id, AllowedStreamIDs.ODD if client_side else AllowedStreamIDs.EVEN
    )
    stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
    block = conn.encoder.encode(headers)
    size = stream.max_outbound_frame_size or len(block)
    flags = END_STREAM if end_stream else 0
    if end_stream:
        stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
    if len(block) <= size:
        frames = _HEADER.pack(len(block) << 8 | HEADERS, flags | END_HEADERS, stream_id) + block
    else:
        pieces = [block[at : at + size] for at in range(0, len(block), size)]
        out = bytearray(_HEADER.pack(len(pieces[0]) << 8 | HEADERS, flags, stream_id))
        out += pieces[0]
        for piece in pieces[1:]:
            last = END_HEADERS if piece is pieces[-1] else 0
            out += _HEADER.pack(len(piece) << 8 | CONTINUATION, last, stream_id)
            out += piece
        frames = bytes(out)
    if stream.state_machine.client and stream._authority is None:
        stream._authority = authority_from_headers(headers)
    stream.request_method = extract_method_header(headers)
    conn._data_to_send += frames
    return True


def receive_headers(
    conn: h2.connection.H2Connection, stream_id: int, block: bytes, end_stream: bool
) -> list[h2.events.Event] | None:
    """h2's handling of a received HEADERS frame with END_HEADERS, no padding and no
    priority, whose whole header block is `block`: its events, or None (nothing changed)
    to give the frame to h2.

    Taken only where h2 would handle it as a request, response or trailers: a new stream
    the peer may open (id above every earlier one, its parity), or one of its open streams.
    Then it is h2's `_receive_headers_frame` without the frame object: the concurrent-stream
    check, HPACK decoding into h2's decoder, the connection's state machine, h2's stream
    object, and the stream's `receive_headers` (state machine, content-length, inbound
    validation and normalization, events). A ProtocolError is h2's too: the GOAWAY it
    queues in `receive_data`, then raised."""
    if not SUPPORTED or conn.state_machine.state is _CLOSED or not stream_id:
        return None
    buffer = conn.incoming_buffer
    if buffer._headers_buffer or buffer._data or buffer._preamble_len:
        return None
    if len(block) > conn.max_inbound_frame_size:
        return None
    client_side = conn.config.client_side
    stream = conn.streams.get(stream_id)
    if stream is None:
        if (
            stream_id % 2 == client_side  # an id of ours
            or stream_id <= conn.highest_inbound_stream_id
            or stream_id in conn._closed_streams
        ):
            return None
    elif stream.state_machine.state not in _CAN_RECEIVE:
        # Headers on a stream closed our way or both ways: h2's `_receive_frame` answers
        # them (RST_STREAM, or a connection error).
        return None
    try:
        if stream is None:
            limit = conn.local_settings.max_concurrent_streams
            if conn.open_inbound_streams + 1 > limit:
                raise h2.exceptions.TooManyStreamsError(f"Max inbound streams is {limit}")
        headers = h2.connection._decode_headers(conn.decoder, block)
        events = conn.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        stream = conn._get_or_create_stream(
            stream_id, AllowedStreamIDs.EVEN if client_side else AllowedStreamIDs.ODD
        )
        _, stream_events = stream.receive_headers(headers, end_stream, conn.config.header_encoding)
    except h2.exceptions.ProtocolError as exc:
        conn._terminate_connection(exc.error_code)
        raise
    return events + stream_events
