"""DATA and WINDOW_UPDATE frames without h2's per-frame objects; h2 keeps the state.

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

The path touches h2 attributes that are not public API, so `SUPPORTED` checks them once
against the installed h2 (a 4.x) and everything goes through h2 when one is missing.
"""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.stream
from h2.connection import ConnectionState
from h2.stream import StreamInputs, StreamState

FRAME_HEADER = 9
DATA = 0x0
WINDOW_UPDATE = 0x8
END_STREAM = 0x1
# length (24 bits) and type in one 32-bit field, then flags and stream id.
_HEADER = struct.Struct(">IBI")
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
    )


SUPPORTED = _supported()


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
