"""HBONE over asyncio: one mTLS HTTP/2 connection carrying many CONNECT tunnels.

`asyncio.Protocol` based (not streams) so it runs the same on uvloop and so that flow
control is explicit: received bytes are acknowledged to the peer only as the reader consumes
them (a slow reader slows its sender), and a writer's `drain()` waits for both HTTP/2 send
windows and the transport's write buffer. Every bound a peer can push against is an
`HboneLimits` field, checked as bytes arrive (`mesh.hbone.guard` for frame sizes).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Self, cast

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame

from mesh.hbone import h2fast, h2mem, heap
from mesh.hbone.guard import FrameGuard, FrameViolation
from mesh.hbone.limits import DEFAULT_LIMITS, HboneLimits
from mesh.hbone.protocol import (
    ConnectRequest,
    HboneError,
    HboneProtocolError,
    HboneStreamRefused,
    Header,
    Status,
    build_connect_request,
    build_response,
    is_success,
    parse_connect_request,
    parse_response_status,
)
from mesh.hbone.relay import PushSource
from mesh.hbone.tcp import connect_nonblocking
from mesh.spiffe import SpiffeId
from mesh.tls import ALPN_H2, PeerIdentityError, TlsError, peer_identity

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
OPEN_STREAM_TIMEOUT = 10.0
# Received chunks below this size are merged, so tiny DATA frames cost no per-chunk overhead.
_COALESCE = 1024
# DATA payloads below this size are copied into the write buffer with their frame header,
# so small frames of one loop iteration share TLS records; larger ones are written as they
# are (uvloop encrypts each piece of a `writelines` separately: no copy, one more record).
_JOIN_LIMIT = 16 * 1024
# h2 would end the whole connection for one stream over our advertised limit; we refuse
# that stream alone (RFC 9113 §5.1.2), so h2's own check is set out of reach.
_H2_STREAM_LIMIT = 2**31 - 1
# Leave room below 2**31 - 1 so a connection nearly out of stream ids is retired, not used.
_LAST_USABLE_STREAM_ID = 2**31 - 1 - 1000

Handler = Callable[["HboneStream", ConnectRequest, SpiffeId], Awaitable[None]]


# RFC 9113 6.9.2: every connection starts with this window.
_DEFAULT_WINDOW = 65535


def _payload_repr(frame: DataFrame | HeadersFrame | ContinuationFrame) -> str:
    return f"<{len(frame.data)} bytes>"


# h2 formats every received frame for its trace log (`repr(frame)` in
# `H2Connection._receive_frame`) before calling the no-op logger, and hyperframe's repr of
# these frames re-serializes and hex-encodes the whole payload: for DATA a third of the
# receiving loop's time under bulk load (docs/performance.md), for HEADERS a few µs per
# tunnel. The size is all a trace line would need.
for _frame_type in (DataFrame, HeadersFrame, ContinuationFrame):
    _frame_type._body_repr = _payload_repr  # type: ignore[method-assign,assignment]
# Every process relaying HBONE (ztunnel, the waypoint) wants these; see mesh.hbone.heap
# and mesh.hbone.h2mem.
heap.tune()
h2mem.install()


def error_name(code: int | None) -> str:
    """The RFC name of an HTTP/2 error code; unknown codes are legal and mean nothing."""
    try:
        return ErrorCodes(code or 0).name
    except ValueError:
        return f"error code {code}"


class HboneConnectError(HboneError, ConnectionError):
    """An HBONE connection could not be set up (TCP, TLS or HTTP/2 preface)."""


class HboneConnectionClosed(HboneError, ConnectionError):
    """The HBONE connection under a stream went away."""


class HboneStreamReset(HboneError, ConnectionResetError):
    """The tunnel was reset (RST_STREAM) by the peer or locally."""

    def __init__(self, message: str, error_code: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code

    @property
    def refused(self) -> bool:
        """REFUSED_STREAM: the peer did not process the stream, so it may be retried
        elsewhere (RFC 9113 8.7); a draining or full peer says so."""
        return self.error_code == ErrorCodes.REFUSED_STREAM


class HboneTimeout(HboneError, TimeoutError):
    """The peer did not answer in time."""


class HboneStream(PushSource):
    """One CONNECT tunnel: a byte duplex with HTTP/2 flow control (a `PushDuplex`)."""

    def __init__(
        self, conn: _HboneConnection, stream_id: int, request: ConnectRequest, peer: SpiffeId
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.request = request
        self.peer = peer
        # Lists, not deques: an idle stream's two deques cost ~1.2 KiB (see TcpDuplex).
        self._recv: list[bytes] = []
        self._recv_eof = False
        self._send: list[bytes] = []
        self._send_size = 0
        self._send_eof_pending = False
        self._send_closed = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._unblocked: list[Callable[[], None]] = []
        # Client side, while open_stream waits for the answer (a future costs ~300 bytes, too
        # much to keep for the stream's life); `_responded` says the answer came or was sent.
        self._response: asyncio.Future[int] | None = None
        self._responded = False

    def __repr__(self) -> str:
        return f"<HboneStream {self.stream_id} {self.request.authority} peer={self.peer}>"

    @property
    def peer_address(self) -> str | None:
        """The IP the tunnel's TCP connection came from (the source pod, for ztunnel peers)."""
        return self._conn.peer_address

    @property
    def is_closed(self) -> bool:
        return self._error is not None or (self._recv_eof and self._send_closed)

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to `max_bytes`; b"" once the peer has sent END_STREAM and all data was read."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        while not self._recv and not self._recv_eof and self._error is None:
            self._read_waiter = asyncio.get_running_loop().create_future()
            await self._read_waiter
        # A reset after the peer's END_STREAM aborts only our sending side.
        if self._error is not None and not self._recv_eof:
            raise self._error
        if not self._recv:
            return b""
        chunk = self._recv.pop(0)
        if len(chunk) > max_bytes:
            self._recv.insert(0, chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._conn._consumed(self, len(chunk))
        return chunk

    def write(self, data: bytes) -> None:
        """Queue `data`; call `drain()` after to respect flow control."""
        if self._error is not None:
            raise self._error
        if self._send_eof_pending or self._send_closed:
            raise HboneError(f"write on stream {self.stream_id} after write_eof()")
        if data and (self._send or not self._conn._send_now(self, data)):
            self._send.append(bytes(data))
            self._send_size += len(data)
            self._conn._pump(self)

    async def drain(self) -> None:
        """Wait until the queued data has mostly been handed to the connection.

        After `write_eof()`, wait until everything, END_STREAM included, was handed over.
        """
        while self._error is None and (
            self._send_size > self._conn._limits.stream_send_buffer
            or (self._send_eof_pending and not self._send_closed)
        ):
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self._error is not None:
            raise self._error

    @property
    def write_blocked(self) -> bool:
        return self._send_size > self._conn._limits.stream_send_buffer

    def when_unblocked(self, callback: Callable[[], None]) -> None:
        self._unblocked.append(callback)

    def eof_sent(self) -> bool:
        if self._error is not None:
            raise self._error
        return self._send_closed

    def write_eof(self) -> None:
        """Half-close: END_STREAM once queued data is sent."""
        if self._error is not None or self._send_eof_pending or self._send_closed:
            return
        self._send_eof_pending = True
        self._conn._pump(self)

    def reset(self, error_code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Abort the tunnel both ways (RST_STREAM)."""
        if self._error is None:
            self._conn._reset_stream(self, error_code)
            self._fail(HboneStreamReset(f"stream {self.stream_id} was reset locally"))

    def close(self) -> None:
        """Release the stream: a no-op if both directions finished, else a reset."""
        if not self.is_closed:
            self.reset()
        self._conn._forget(self)

    async def accept(self) -> None:
        """Server side: answer 200 so the client starts sending tunnel bytes."""
        self._respond(Status.OK, end_stream=False)

    def refuse(self, status: int) -> None:
        """Server side: answer a non-2xx status and end the stream."""
        if is_success(status):
            raise ValueError(f"refuse() needs a non-2xx status, got {status}")
        self._respond(status, end_stream=True)
        self._send_closed = True
        self._conn._forget_if_done(self)

    def _respond(self, status: int, *, end_stream: bool) -> None:
        if self._responded:
            raise HboneError(f"stream {self.stream_id} already answered")
        if self._error is not None:
            raise self._error
        self._responded = True
        try:
            self._conn._send_headers(self, build_response(status), end_stream=end_stream)
        except HboneError as exc:  # the stream or the connection ended meanwhile
            self._fail(exc)
            raise

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)
        if self._push is not None:
            self._deliver()

    def _released(self, size: int) -> None:
        self._conn._consumed(self, size)

    def _wake_writer(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self._unblocked:
            callbacks, self._unblocked = self._unblocked, []
            for callback in callbacks:
                callback()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._response is not None and not self._response.done():
            self._response.set_exception(error)
            # Retrieved or not, a failed open must not log "exception never retrieved".
            self._response.exception()
        if not self._recv_eof:
            unread = sum(len(chunk) for chunk in self._recv)
            self._recv.clear()
            self._conn._consumed(self, unread)
        self._send.clear()
        self._send_size = 0
        self._wake_reader()
        self._wake_writer()


_READ_BUFFER_SIZE = 256 * 1024
_read_buffers = threading.local()


def _read_buffer() -> memoryview:
    """This thread's buffer that TLS decrypts into, shared by all its connections:
    `data_received` is done with it (h2 and `_held` copy) before the loop reads again."""
    buffer: memoryview | None = getattr(_read_buffers, "buffer", None)
    if buffer is None:
        buffer = _read_buffers.buffer = memoryview(bytearray(_READ_BUFFER_SIZE))
    return buffer


def _cipher_buffer() -> memoryview:
    """This thread's buffer the socket is read into, shared like `_read_buffer()`: its bytes
    are in the connection's incoming `MemoryBIO` before the loop reads again."""
    buffer: memoryview | None = getattr(_read_buffers, "cipher", None)
    if buffer is None:
        buffer = _read_buffers.cipher = memoryview(bytearray(_READ_BUFFER_SIZE))
    return buffer


class _HboneConnection(asyncio.BufferedProtocol):
    """What client and server share: TLS, the h2 state machine, flow control, stream table,
    limits and deadlines.

    TLS is ours (an `ssl.SSLObject` between two `MemoryBIO`s over a plain TCP transport),
    not the event loop's: uvloop's TLS transport mallocs a 256 KiB read buffer per
    connection (partly resident, ~12 KiB per HBONE connection and end, more once heap memory
    that bulk traffic touched is reused for it) and keeps a protocol, an app transport and
    their queues; here the socket is read into one buffer per thread (`_cipher_buffer()`)
    and TLS decrypts straight into another (`_read_buffer()`), with the same OpenSSL calls
    per read and write as uvloop's. With ``tls=None`` the transport brings TLS itself (a
    loop's ``ssl=`` transport, or a test's) and the protocol reads and writes plaintext.
    """

    def __init__(
        self,
        *,
        client_side: bool,
        limits: HboneLimits,
        idle_timeout: float,
        tls: ssl.SSLContext | None,
        server_hostname: str | None = None,
    ) -> None:
        self._limits = limits
        self._tls_context = tls
        self._own_tls = tls is not None
        self._server_hostname = server_hostname or None
        self._tls: ssl.SSLObject | None = None
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # This thread's cipher and plaintext buffers, looked up once, not per read.
        self._buffers = (_cipher_buffer(), _read_buffer())
        self._tls_up = False
        self._tls_closed = False  # close_notify sent: nothing more to write or read
        # Why TLS ended the connection, for connection_lost (the transport reports None).
        self._tls_error: Exception | None = None
        self._idle_timeout = idle_timeout
        self._h2 = h2.connection.H2Connection(
            h2fast.Config(
                client_side=client_side,
                header_encoding="utf-8",
                # Every header block we send is built and checked by mesh.hbone.protocol
                # (fixed pseudo-headers, extra headers as lowercase tokens with clean values),
                # so h2 checking it again only costs: ~20 % of a HEADERS send. What the peer
                # sends is still validated and normalized by h2.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self._guard = FrameGuard(
            server=not client_side,
            max_frame_size=limits.max_frame_size,
            max_header_block=limits.max_header_list_size,
        )
        self._transport: asyncio.Transport | None = None
        # Received bytes of a frame whose end has not arrived (see _whole_frames).
        self._held: list[bytes] = []
        # A DATA frame on the fast path (h2fast) whose payload is still arriving.
        self._fast_stream: HboneStream | None = None
        self._fast_left = 0
        self._fast_end = False  # that frame carries END_STREAM
        # Frame bytes to write, in order: whole pieces, then the small frames in `_out_tail`;
        # h2's own output is appended whenever we add a frame, so the order is the wire order.
        self._out: list[bytes | bytearray] = []
        self._out_tail = bytearray()
        self._streams: dict[int, HboneStream] = {}
        self._write_paused = False
        self._read_paused = False
        # Frames h2 queued since the last write, and whether that write is scheduled.
        self._unwritten = 0
        self._write_scheduled = False
        self._lost: BaseException | None = None
        # Set once we stop serving (GOAWAY sent, connection lost): no more frames in or out.
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()
        self._goaway = False
        self._preface_done = False
        self._state_waiters: list[asyncio.Future[None]] = []
        # Deadlines: preface (server) or idle, an unfinished header block, a closing flush.
        self._deadline: asyncio.TimerHandle | None = None
        self._idle_since: float | None = None
        self._headers_deadline: asyncio.TimerHandle | None = None
        self._abort_deadline: asyncio.TimerHandle | None = None
        self.peer: SpiffeId | None = None

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def peer_address(self) -> str | None:
        peername = self._transport.get_extra_info("peername") if self._transport else None
        return str(peername[0]) if peername else None

    def close(self) -> None:
        """GOAWAY and close the connection; open streams fail."""
        self._shut(ErrorCodes.NO_ERROR, f"HBONE connection to {self.peer} closed locally")

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The TCP connection is up: start the TLS handshake (`_established` follows it)."""
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=self._limits.write_high_water)
        if self._tls_context is None:
            self._tls = transport.get_extra_info("ssl_object")
            self._tls_up = True
            self._established()
            return
        self._tls = self._tls_context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=not self._h2.config.client_side,
            server_hostname=self._server_hostname,
        )
        self._handshake()

    def _handshake(self) -> None:
        """One step of the TLS handshake with what arrived; `_established` once it is done."""
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_tls()
            return
        except (ssl.SSLError, OSError) as exc:
            self._send_tls()  # the alert telling the peer why
            self._tls_failed(exc, abort=False)
            return
        self._send_tls()
        self._tls_up = True
        self._established()

    def _tls_failed(self, exc: Exception, *, abort: bool = True) -> None:
        """TLS broke (handshake refused, a bad record): end the connection; what the
        transport already holds (an alert) is sent first unless ``abort``."""
        log.debug("TLS with HBONE peer %s failed: %r", self.peer or self._where(), exc)
        if self._tls_error is None:
            self._tls_error = exc
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()

    def _where(self) -> str:
        peername = self._transport.get_extra_info("peername") if self._transport else None
        return "{}:{}".format(*peername[:2]) if peername else "HBONE peer"

    def _send_tls(self) -> None:
        """Hand what TLS produced (handshake messages, alerts, records) to the socket."""
        data = self._outgoing.read()
        transport = self._transport
        if data and transport is not None and not transport.is_closing() and not self._tls_closed:
            transport.write(data)

    def _established(self) -> None:
        """TLS is up: start HTTP/2."""
        client_side = self._h2.config.client_side
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self._limits.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: self._limits.max_frame_size,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._limits.max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self._limits.max_header_list_size,
        }
        if client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self._h2.local_settings = h2.settings.Settings(client_side, settings)
        self._h2.initiate_connection()
        settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = _H2_STREAM_LIMIT
        self._h2.local_settings = h2.settings.Settings(client_side, settings)
        # h2 applies our frame and header list limits only once the peer acks our SETTINGS;
        # until then it would accept its defaults (a 64 KiB header list).
        self._h2.max_inbound_frame_size = self._limits.max_frame_size
        self._h2.decoder.max_header_list_size = self._limits.max_header_list_size
        if self._limits.connection_window > _DEFAULT_WINDOW:
            self._h2.increment_flow_control_window(self._limits.connection_window - _DEFAULT_WINDOW)
        self._write_out()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffers[0] if self._own_tls else self._buffers[1]

    def buffer_updated(self, nbytes: int) -> None:
        if not self._own_tls:
            self.data_received(self._buffers[1][:nbytes])
            return
        if self._tls_closed:
            return
        self._incoming.write(self._buffers[0][:nbytes])
        if not self._tls_up:
            self._handshake()
            if not self._tls_up:
                return
        self._decrypt()

    def _decrypt(self) -> None:
        """Decrypt what arrived into `_read_buffer()` (as many records as fit) and hand it
        to `data_received` in one piece; the peer's close_notify ends the connection."""
        tls = self._tls
        transport = self._transport
        if tls is None or transport is None or self._tls_error is not None or self._tls_closed:
            return
        incoming = self._incoming
        # The C object under the SSLObject: its Python wrappers of read and pending cost
        # a call frame each, per read.
        c_tls = tls._sslobj  # type: ignore[attr-defined]
        view = self._buffers[1]
        size = len(view)
        total = 0
        ended = False
        failed: Exception | None = None
        try:
            # Not until SSLWantReadError alone: raising it costs more than asking.
            while incoming.pending or c_tls.pending():
                count: int = c_tls.read(size - total, view[total:] if total else view)
                if not count:
                    ended = True
                    break
                total += count
                if total == size:  # the rest once this buffer was handed on
                    self._loop.call_soon(self._decrypt)
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            ended = True
        except (ssl.SSLError, OSError) as exc:
            failed = exc
        if total:
            self.data_received(view[:total])
        if self._outgoing.pending:  # e.g. the answer to a KeyUpdate
            self._send_tls()
        if failed is not None:
            self._tls_failed(failed)
        elif ended and not transport.is_closing():
            transport.close()

    def data_received(self, data: bytes | memoryview) -> None:
        if self._closing:
            return
        try:
            self._guard.feed(data)
        except FrameViolation as exc:
            log.warning("HBONE peer %s: %s; closing the connection", self.peer, exc)
            self._shut(exc.error_code, f"HBONE peer {self.peer} broke a limit: {exc}")
            return
        if self._guard.in_header_block != (self._headers_deadline is not None):
            self._time_header_block()
        if self._preface_done and h2fast.SUPPORTED:
            self._receive_frames(data)
            return
        whole = self._whole_frames(data)
        if whole is not None:
            self._to_h2(whole)

    def _to_h2(self, data: bytes | memoryview) -> bool:
        """Whole frames through h2 and their events dispatched; False once we shut."""
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._broke_http2(exc)
            return False
        for event in events:
            self._dispatch(event)
        self._flush()
        return not self._closing

    def _broke_http2(self, exc: h2.exceptions.ProtocolError) -> None:
        log.warning("HBONE peer %s broke HTTP/2, closing the connection: %s", self.peer, exc)
        # h2 has queued its GOAWAY already.
        self._shut(None, f"HBONE peer {self.peer} broke HTTP/2: {exc}")

    def _receive_frames(self, data: bytes | memoryview) -> None:
        """After the preface: DATA frames without padding and HEADERS frames holding a whole
        header block take the fast path (`h2fast`), the rest go to h2 in runs of whole
        frames, in wire order.

        A fast DATA frame's payload goes to its stream as it arrives, also the part of a
        frame that continues in later reads, with one copy (out of the shared read buffer);
        h2's path copied it three times and waited for the whole frame. Before each DATA
        or HEADERS frame the frames ahead of it are given to h2 first, so the stream state
        the fast path checks is the one h2 would check.
        """
        view = memoryview(data)
        pos = 0
        if self._fast_left:
            pos = self._fast_piece(view, 0)
            if pos == len(view):
                return
        if self._held:
            view = memoryview(b"".join([*self._held, view[pos:]]))
            self._held = []
            pos = 0
        end = len(view)
        start = pos  # the first frame not yet handled
        # A reader woken by fast DATA may close the connection: stop there, as h2 would.
        while end - pos >= h2fast.FRAME_HEADER and not self._closing:
            # One C call for the 9 bytes (length and type, flags, stream id): a third of
            # the time of indexing them one by one.
            length_kind, flags, stream_id = h2fast.parse_frame_header(view, pos)
            length = length_kind >> 8
            kind = length_kind & 0xFF
            stream_id &= h2fast.STREAM_ID_MASK
            if kind == h2fast.DATA and not flags & ~h2fast.END_STREAM:
                if start < pos and not self._to_h2(view[start:pos]):
                    return
                start = pos
                if self._fast_data(stream_id, length, bool(flags)):
                    pos = start = self._fast_piece(view, pos + h2fast.FRAME_HEADER)
                    continue
            elif (
                kind == h2fast.HEADERS
                and flags & h2fast.END_HEADERS
                and not flags & ~(h2fast.END_HEADERS | h2fast.END_STREAM)
                and pos + h2fast.FRAME_HEADER + length <= end
            ):
                if start < pos and not self._to_h2(view[start:pos]):
                    return
                start = pos
                if self._fast_headers(
                    view, pos, stream_id, length, bool(flags & h2fast.END_STREAM)
                ):
                    pos = start = pos + h2fast.FRAME_HEADER + length
                    continue
            if pos + h2fast.FRAME_HEADER + length > end:
                break
            pos += h2fast.FRAME_HEADER + length
        if self._closing or (start < pos and not self._to_h2(view[start:pos])):
            return
        if pos < end:
            self._held = [bytes(view[pos:end])]

    def _fast_data(self, stream_id: int, length: int, end_stream: bool) -> bool:
        """Take the DATA frame for `stream_id` if h2 would accept it plainly."""
        stream = self._streams.get(stream_id)
        if stream is None or stream._error is not None or not self._data_allowed(stream):
            return False
        h2_stream = h2fast.receivable(self._h2, stream_id, length)
        if h2_stream is None:
            return False
        h2fast.data_received(self._h2, h2_stream, length, end_stream)
        self._fast_stream = stream
        self._fast_left = length
        self._fast_end = end_stream
        return True

    def _fast_headers(
        self, view: memoryview, at: int, stream_id: int, length: int, end_stream: bool
    ) -> bool:
        """Give the whole HEADERS frame at `at` to h2's header handling without its frame
        object (h2fast.receive_headers), and dispatch the events; False leaves it to h2."""
        start = at + h2fast.FRAME_HEADER
        try:
            events = h2fast.receive_headers(
                self._h2, stream_id, bytes(view[start : start + length]), end_stream
            )
        except h2.exceptions.ProtocolError as exc:
            self._broke_http2(exc)
            return True
        if events is None:
            return False
        for event in events:
            self._dispatch(event)
        self._flush()
        return True

    def _fast_piece(self, view: memoryview, at: int) -> int:
        """Hand the fast DATA frame's payload bytes from `at` to its stream; where they end."""
        stream = self._fast_stream
        assert stream is not None
        take = min(self._fast_left, len(view) - at)
        self._fast_left -= take
        if take:
            if stream._error is None:
                self._data_arrived(stream, bytes(view[at : at + take]))
            else:
                self._consumed(stream, take)  # nobody reads them: back to the peer's window
        if not self._fast_left:
            self._fast_stream = None
            if self._fast_end:
                self._fast_end = False
                self._ended(stream)
        return at + take

    def _data_allowed(self, stream: HboneStream) -> bool:
        """Whether DATA may reach the stream's reader (the server answered it)."""
        return stream._responded

    def _whole_frames(self, data: bytes | memoryview) -> bytes | memoryview | None:
        """The received bytes up to the last complete frame; the rest is held back.

        h2 appends what it gets to a bytearray, and while a large frame arrives piece by
        piece every append reallocates and copies the part already there (many copies per
        byte for 256 KiB frames). Handing it whole frames only keeps that to one.
        """
        incomplete = self._guard.incomplete
        if not self._held and not incomplete:
            return data
        if incomplete >= sum(map(len, self._held)) + len(data):
            self._held.append(bytes(data))
            return None
        buffer = memoryview(b"".join([*self._held, data]) if self._held else data)
        self._held = [bytes(buffer[len(buffer) - incomplete :])] if incomplete else []
        return buffer[: len(buffer) - incomplete]

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        exc = exc or self._tls_error
        self._closing = True
        for handle in (self._deadline, self._headers_deadline, self._abort_deadline):
            if handle is not None:
                handle.cancel()
        self._lost = exc or HboneConnectionClosed(f"HBONE connection to {self.peer} closed")
        self._fail_all(HboneConnectionClosed(f"HBONE connection to {self.peer} lost: {self._lost}"))
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._read_paused and self._transport is not None and not self._closing:
            self._read_paused = False
            self._transport.resume_reading()
        for stream in list(self._streams.values()):
            self._pump(stream, flush=False)
        self._flush()

    def _shut(self, error_code: ErrorCodes | None, reason: str) -> None:
        """Fail every stream, send GOAWAY `error_code` (None: h2 queued one) and close;
        abort if the peer does not take the last bytes within `close_timeout`."""
        if self._closing or self._transport is None:
            return
        if error_code is not None:
            self._h2.close_connection(error_code)
        self._write_out()
        self._closing = True
        self._fail_all(HboneConnectionClosed(reason))
        if self._own_tls and self._tls_up and self._transport.can_write_eof():
            # close_notify and FIN, then read (and drop) until the peer closes too, as the
            # loop's TLS transport did: a close with the peer's bytes unread would be a
            # reset, which can discard our GOAWAY before the peer read it.
            assert self._tls is not None
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            self._send_tls()
            self._tls_closed = True
            if not self._transport.is_closing():
                self._transport.write_eof()
        else:
            self._transport.close()
        self._abort_deadline = asyncio.get_running_loop().call_later(
            self._limits.close_timeout, self._abort
        )

    def _fail_all(self, error: HboneError) -> None:
        for stream in list(self._streams.values()):
            self._peer_failed(stream, error)
        self._notify_state()

    def _peer_failed(self, stream: HboneStream, error: HboneError) -> None:
        """The peer or the connection ended `stream` (not our own code)."""
        stream._fail(error)
        self._forget(stream)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                self._ended(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                self._peer_failed(
                    stream,
                    HboneStreamReset(
                        f"peer {self.peer} reset stream {event.stream_id} "
                        f"({error_name(event.error_code)})",
                        event.error_code,
                    ),
                )
        elif isinstance(event, h2.events.WindowUpdated):
            targets = (
                list(self._streams.values())
                if event.stream_id == 0
                else [s for s in (self._streams.get(event.stream_id),) if s is not None]
            )
            for stream in targets:
                self._pump(stream, flush=False)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._on_settings()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway = True
            self._on_goaway(event)
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        data = event.data or b""
        padding = event.flow_controlled_length - len(data)
        if stream is None or stream._error is not None:
            self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        if padding:
            self._h2.acknowledge_received_data(padding, event.stream_id)
        if data:
            self._data_arrived(stream, data)

    def _ended(self, stream: HboneStream) -> None:
        """The peer's END_STREAM, after its last DATA: EOF for the reader."""
        if self._streams.get(stream.stream_id) is stream:
            stream._recv_eof = True
            stream._wake_reader()
            self._forget_if_done(stream)

    def _data_arrived(self, stream: HboneStream, data: bytes) -> None:
        recv = stream._recv
        if recv and len(data) < _COALESCE and len(recv[-1]) < _COALESCE:
            recv[-1] += data
        else:
            recv.append(data)
        stream._wake_reader()

    def _on_settings(self) -> None:
        if not self._preface_done:
            self._preface_done = True
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            if not self._streams:
                self._went_idle()
        self._notify_state()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        # h2 sends nothing more once a GOAWAY arrived (its connection state is CLOSED), so
        # no stream can go on, whatever last_stream_id says: end them all now.
        self._shut(None, f"peer {self.peer} sent GOAWAY ({error_name(event.error_code)})")

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        assert event.stream_id is not None
        self._h2_reset(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        assert event.stream_id is not None
        self._h2_reset(event.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _h2_closed(self) -> bool:
        """h2 takes no more frames to send: it closed the connection, also on a GOAWAY read
        later in the same batch of frames whose earlier events are still being dispatched."""
        return bool(self._h2.state_machine.state is h2.connection.ConnectionState.CLOSED)

    def _h2_reset(self, stream_id: int, error_code: ErrorCodes) -> None:
        """RST_STREAM, unless h2 has ended the stream itself (a stream error it answered
        while reading the same batch) or the connection."""
        if not self._h2_closed():
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self._h2.reset_stream(stream_id, error_code)

    def _consumed(self, stream: HboneStream, size: int) -> None:
        if not size or self._closing:
            return
        if h2fast.SUPPORTED:
            frames = h2fast.acknowledge(self._h2, stream.stream_id, size)
            if frames:
                self._queue(frames)
                self._flush()
        else:
            self._h2.acknowledge_received_data(size, stream.stream_id)
            self._flush()

    def _pump(self, stream: HboneStream, *, flush: bool = True) -> None:
        """Move queued bytes into HTTP/2 DATA frames as far as windows and the transport allow."""
        if self._closing or stream._error is not None:
            return
        try:
            self._send_queued(stream)
        except h2.exceptions.StreamClosedError:
            # h2 took the peer's RST_STREAM in the same batch of bytes as the WINDOW_UPDATE
            # that brought us here; its StreamReset event, dispatched next, fails the stream.
            return
        if stream._send_size <= self._limits.stream_send_buffer:
            stream._wake_writer()
        if flush:
            self._flush()

    def _send_queued(self, stream: HboneStream) -> None:
        sid = stream.stream_id
        h2c = self._h2
        frame_size = min(h2c.max_outbound_frame_size, self._limits.max_frame_size)
        # Not None: DATA frames are built here and accounted in h2's windows (h2fast).
        fast = h2fast.sendable(h2c, sid)
        while stream._send and not self._write_paused:
            window = min(
                h2fast.send_window(h2c, fast)
                if fast is not None
                else h2c.local_flow_control_window(sid),
                frame_size,
            )
            if window <= 0:
                break
            chunk = stream._send[0]
            if len(chunk) > window:
                stream._send[0] = chunk[window:]
                chunk = chunk[:window]
            else:
                stream._send.pop(0)
            if fast is not None:
                self._queue(h2fast.data_sent(h2c, fast, len(chunk)))
                if len(chunk) < _JOIN_LIMIT:
                    self._out_tail += chunk
                else:
                    self._out.append(self._out_tail)
                    self._out.append(chunk)
                    self._out_tail = bytearray()
            else:
                h2c.send_data(sid, chunk)
            stream._send_size -= len(chunk)
            self._unwritten += len(chunk)
            if self._unwritten >= self._limits.write_high_water:
                # Written now, so pause_writing stops us at the transport's high-water mark
                # and h2's own buffer never holds more than that.
                self._write_out()
        if not stream._send and stream._send_eof_pending and not stream._send_closed:
            if fast is not None:
                self._queue(h2fast.end_stream_sent(fast))
            else:
                h2c.end_stream(sid)
            stream._send_closed = True
            self._forget_if_done(stream)

    def _send_now(self, stream: HboneStream, data: bytes) -> bool:
        """One DATA frame for `data`, with nothing of the stream queued before it, if the
        windows, the frame size and the transport take it whole (a request or a response
        of a keep-alive tunnel): what `_pump` would send, without the queue; False leaves
        it to the queue."""
        if self._closing or self._write_paused or stream._error is not None:
            return False
        h2c = self._h2
        fast = h2fast.sendable(h2c, stream.stream_id)
        size = len(data)
        if (
            fast is None
            or size > h2fast.send_window(h2c, fast)
            or size > h2c.max_outbound_frame_size
            or size > self._limits.max_frame_size
        ):
            return False
        self._queue(h2fast.data_sent(h2c, fast, size))
        if size < _JOIN_LIMIT:
            self._out_tail += data
        else:
            self._out.append(self._out_tail)
            self._out.append(bytes(data))
            self._out_tail = bytearray()
        self._unwritten += size
        if self._unwritten >= self._limits.write_high_water:
            self._write_out()
        else:
            self._flush()
        return True

    def _send_headers(
        self, stream: HboneStream, headers: list[Header], *, end_stream: bool
    ) -> None:
        if self._closing or self._h2_closed():
            raise HboneConnectionClosed(f"HBONE connection to {self.peer} is closed")
        raw = [(name.encode(), value.encode()) for name, value in headers]
        try:
            if not h2fast.send_headers(self._h2, stream.stream_id, raw, end_stream):
                self._h2.send_headers(stream.stream_id, raw, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            raise HboneStreamReset(f"stream {stream.stream_id} was closed by h2") from None
        self._flush()

    def _reset_stream(self, stream: HboneStream, error_code: ErrorCodes) -> None:
        if not self._closing:
            self._h2_reset(stream.stream_id, error_code)
            self._flush()
        self._forget(stream)

    def _add_stream(self, stream: HboneStream) -> None:
        self._streams[stream.stream_id] = stream
        self._idle_since = None

    def _forget_if_done(self, stream: HboneStream) -> None:
        if stream._recv_eof and stream._send_closed:
            self._forget(stream)

    def _forget(self, stream: HboneStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            if not self._streams:
                self._went_idle()
            self._notify_state()

    def _went_idle(self) -> None:
        """Start the idle clock; one timer serves many idle periods (cheap per stream)."""
        if self._closing or not self._preface_done:
            return
        loop = asyncio.get_running_loop()
        self._idle_since = loop.time()
        if self._deadline is None:
            self._deadline = loop.call_later(self._idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._deadline = None
        if self._idle_since is None or self._closing:
            return
        left = self._idle_since + self._idle_timeout - asyncio.get_running_loop().time()
        if left > 0:
            self._deadline = asyncio.get_running_loop().call_later(left, self._idle_check)
            return
        log.debug("HBONE connection to %s idle for %.0fs, closing", self.peer, self._idle_timeout)
        self.close()

    def _time_header_block(self) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None
        else:
            self._headers_deadline = asyncio.get_running_loop().call_later(
                self._limits.headers_timeout,
                self._expire,
                ErrorCodes.PROTOCOL_ERROR,
                f"header block unfinished after {self._limits.headers_timeout}s",
            )

    def _expire(self, error_code: ErrorCodes, what: str) -> None:
        log.warning("HBONE peer %s: %s; closing the connection", self.peer, what)
        self._shut(error_code, f"HBONE peer {self.peer}: {what}")

    def _notify_state(self) -> None:
        waiters, self._state_waiters = self._state_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _state_changed(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._state_waiters.append(waiter)
        await waiter

    def _flush(self) -> None:
        """Write what h2 queued, once per event-loop iteration.

        Everything the connection produces while the loop runs this iteration's callbacks
        (DATA of several streams, WINDOW_UPDATEs, HEADERS, answers to PING and SETTINGS) goes
        out as one TLS write: one encryption call and one syscall instead of one per frame.
        The write runs before the loop next waits for I/O, so nothing waits longer.
        """
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write_out)

    def _queue(self, frames: bytes) -> None:
        """Queue frames we built, after everything h2 queued before them."""
        tail = self._out_tail
        from_h2 = h2fast.take_output(self._h2)
        if from_h2:
            tail += from_h2
        tail += frames

    def _write_out(self) -> None:
        self._write_scheduled = False
        self._unwritten = 0
        pieces, tail = self._out, self._out_tail
        from_h2 = h2fast.take_output(self._h2)
        if tail:
            tail += from_h2
            pieces.append(tail)
            self._out_tail = bytearray()
        elif from_h2:
            pieces.append(from_h2)
        if not pieces:
            return
        self._out = []
        transport = self._transport
        if transport is None or transport.is_closing() or self._tls_closed:
            return
        if self._own_tls:
            # One encrypted write for all the pieces, as uvloop's TLS transport made.
            tls = self._tls
            assert tls is not None
            write = tls._sslobj.write  # type: ignore[attr-defined]  # as in _decrypt
            for piece in pieces:
                write(piece)
            transport.write(self._outgoing.read())
        # Each piece is owned by the transport now: nothing here writes into it again.
        elif len(pieces) == 1:
            transport.write(pieces[0])
        else:
            transport.writelines(pieces)
        if (
            not self._read_paused
            and transport.get_write_buffer_size() > self._limits.write_buffer_limit
        ):
            # The peer makes us answer (PING, SETTINGS, RST_STREAM) but does not read.
            self._read_paused = True
            transport.pause_reading()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


async def connect_socket(
    sock: socket.socket, address: tuple[str, int], *, timeout: float = CONNECT_TIMEOUT
) -> None:
    """Connect a caller-made socket (e.g. created inside a pod's netns) without blocking."""
    sock.setblocking(False)
    try:
        await connect_nonblocking(sock, address, timeout)
    except TimeoutError:
        raise HboneTimeout(
            f"TCP connect to {address[0]}:{address[1]} timed out after {timeout}s "
            "(is the peer up, and does a NetworkPolicy or firewall allow port 15008?)"
        ) from None
    except OSError as exc:
        raise HboneConnectError(
            f"TCP connect to {address[0]}:{address[1]} failed: {exc.strerror or exc}"
        ) from exc


class HboneClientConnection(_HboneConnection):
    """The client end: opens CONNECT tunnels to one verified peer."""

    def __init__(
        self,
        limits: HboneLimits = DEFAULT_LIMITS,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__(
            client_side=True,
            limits=limits,
            idle_timeout=limits.client_idle_timeout,
            tls=tls,
            server_hostname=server_hostname,
        )
        loop = asyncio.get_running_loop()
        self._handshake_done: asyncio.Future[None] = loop.create_future()
        self._preface: asyncio.Future[None] = loop.create_future()

    @classmethod
    async def connect(
        cls,
        sock: socket.socket,
        ssl_context: ssl.SSLContext,
        expected_peer: SpiffeId | set[SpiffeId] | frozenset[SpiffeId] | None,
        server_hostname: str | None = None,
        *,
        address: tuple[str, int] | None = None,
        timeout: float = CONNECT_TIMEOUT,
        limits: HboneLimits = DEFAULT_LIMITS,
    ) -> Self:
        """mTLS + HTTP/2 over `sock` (connected first to `address` if given), peer checked.

        Returns only once the server's HTTP/2 preface arrived: with TLS 1.3 the server
        checks our certificate after our side of the handshake is done, so a rejection
        shows up here rather than on the first stream.
        """
        loop = asyncio.get_running_loop()
        where = "{}:{}".format(*address) if address else _describe_peer(sock)
        conn: Self | None = None
        try:
            async with asyncio.timeout(timeout):
                if address is not None:
                    await connect_socket(sock, address, timeout=timeout)
                _, conn = await loop.create_connection(
                    lambda: cls(limits, tls=ssl_context, server_hostname=server_hostname), sock=sock
                )
                await asyncio.shield(conn._handshake_done)
                conn._check_peer(expected_peer, where)
                await asyncio.shield(conn._preface)
            return conn
        except TimeoutError:
            if conn is not None:
                conn._abort()
            raise HboneTimeout(
                f"HBONE connection setup with {where} timed out after {timeout}s"
            ) from None
        except (HboneError, TlsError):
            if conn is not None:
                conn._abort()
            raise
        except (ssl.SSLError, OSError) as exc:
            if conn is not None:
                conn._abort()
            raise HboneConnectError(
                f"mTLS handshake with {where} failed: {exc} "
                "(do both sides trust the same mesh root?)"
            ) from exc

    def _check_peer(
        self,
        expected: SpiffeId | set[SpiffeId] | frozenset[SpiffeId] | None,
        where: str,
    ) -> None:
        ssl_object = self._tls
        assert ssl_object is not None and self._tls_up
        alpn = ssl_object.selected_alpn_protocol()
        if alpn != ALPN_H2:
            raise HboneConnectError(
                f"{where} negotiated ALPN {alpn!r}, not h2: is it an HBONE port (15008)?"
            )
        self.peer = peer_identity(ssl_object)
        allowed = {expected} if isinstance(expected, SpiffeId) else expected
        if allowed is not None and self.peer not in allowed:
            wanted = ", ".join(sorted(str(s) for s in allowed))
            raise PeerIdentityError(
                f"{where} presented identity {self.peer}, expected {wanted}; "
                "refusing to send traffic to an impostor or a stale endpoint"
            )

    @property
    def is_usable(self) -> bool:
        """Whether new streams may still be opened on this connection."""
        return (
            not self._closing
            and not self._goaway
            and self._transport is not None
            and not self._transport.is_closing()
            and self._h2.highest_outbound_stream_id < _LAST_USABLE_STREAM_ID
        )

    async def open_stream(
        self,
        authority: str,
        extra_headers: Iterable[Header] = (),
        *,
        timeout: float = OPEN_STREAM_TIMEOUT,
    ) -> HboneStream:
        """CONNECT to `authority`; waits for a free stream slot and the peer's answer.

        Raises `HboneStreamRefused` on a non-2xx answer, `HboneTimeout`, or
        `HboneConnectionClosed` when the connection cannot take new streams.
        """
        headers = build_connect_request(authority, extra_headers)
        request = parse_connect_request(headers)
        stream: HboneStream | None = None
        try:
            async with asyncio.timeout(timeout):
                while self.is_usable and (
                    self._h2.open_outbound_streams
                    >= self._h2.remote_settings.max_concurrent_streams
                ):
                    await self._state_changed()
                if not self.is_usable:
                    raise HboneConnectionClosed(
                        f"HBONE connection to {self.peer} no longer accepts new streams"
                    )
                assert self.peer is not None
                stream = HboneStream(
                    self, self._h2.get_next_available_stream_id(), request, self.peer
                )
                self._add_stream(stream)
                stream._response = response = self._loop.create_future()
                self._send_headers(stream, headers, end_stream=False)
                status = await asyncio.shield(response)
        except TimeoutError:
            if stream is not None:
                stream.reset()
            raise HboneTimeout(
                f"CONNECT {authority} to {self.peer} got no answer within {timeout}s"
            ) from None
        except asyncio.CancelledError:
            if stream is not None:
                stream.reset()
            raise
        finally:
            if stream is not None:
                stream._response = None
        if not is_success(status):
            stream.close()
            raise HboneStreamRefused(status, authority)
        return stream

    def _established(self) -> None:
        self._handshake_done.set_result(None)
        super()._established()

    def _on_settings(self) -> None:
        if not self._preface.done():
            self._preface.set_result(None)
        super()._on_settings()

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None or stream._response is None or stream._response.done():
            return
        try:
            status = parse_response_status(event.headers or [])
        except HboneProtocolError as exc:
            stream.reset(ErrorCodes.PROTOCOL_ERROR)
            stream._fail(exc)
            return
        stream._responded = True  # its DATA may reach the reader from now on
        stream._response.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        exc = exc or self._tls_error
        if not self._handshake_done.done():
            self._handshake_done.set_exception(
                exc or ConnectionResetError("connection closed during the TLS handshake")
            )
            self._handshake_done.exception()
        if not self._preface.done():
            self._preface.set_exception(
                HboneConnectError(
                    f"server closed the connection during setup ({exc or 'no error given'}); "
                    "did it reject our certificate (different mesh root, expired)?"
                )
            )
            self._preface.exception()
        super().connection_lost(exc)


def _describe_peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "HBONE peer"
    return f"{host}:{port}"


class HboneServerProtocol(_HboneConnection):
    """The server end: one instance per accepted mTLS connection.

    Use with `loop.create_server(server_factory(handler, tls=context), sock=...)`, not
    with the loop's ``ssl=``: the protocol does TLS itself (see `_HboneConnection`).
    Each valid CONNECT runs `handler(stream, request, peer)` in its own task; the handler
    must `await stream.accept()` or `stream.refuse(status)`, then relay. Malformed requests
    get 400 without reaching the handler. A stream the peer resets (or sends DATA on)
    before it was answered cancels its handler, so no upstream is opened for nobody.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        tls: ssl.SSLContext | None = None,
        limits: HboneLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(
            client_side=False, limits=limits, idle_timeout=limits.idle_timeout, tls=tls
        )
        self._handler = handler
        self._tasks: dict[HboneStream, asyncio.Future[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._own_tls:
            timeout = self._limits.handshake_timeout
            self._deadline = asyncio.get_running_loop().call_later(
                timeout,
                self._tls_failed,
                HboneTimeout(f"TLS handshake not done within {timeout}s"),
            )
        super().connection_made(transport)

    def _established(self) -> None:
        assert self._tls is not None and self._transport is not None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        try:
            if self._tls.selected_alpn_protocol() != ALPN_H2:
                raise HboneProtocolError("client did not negotiate TLS with ALPN h2")
            self.peer = peer_identity(self._tls)
        except (HboneError, TlsError) as exc:
            log.warning("rejecting HBONE connection from %s: %s", self._where(), exc)
            self._closing = True
            self._transport.abort()
            return
        super()._established()
        timeout = self._limits.preface_timeout
        self._deadline = asyncio.get_running_loop().call_later(
            timeout,
            self._expire,
            ErrorCodes.SETTINGS_TIMEOUT,
            f"no HTTP/2 preface within {timeout}s of the TLS handshake",
        )

    def _peer_failed(self, stream: HboneStream, error: HboneError) -> None:
        super()._peer_failed(stream, error)
        task = self._tasks.get(stream)
        # An answered stream's handler is relaying: it sees the error and reports its counts.
        if task is not None and not stream._responded:
            task.cancel()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        assert event.stream_id is not None and self.peer is not None
        if len(self._streams) >= self._limits.max_concurrent_streams:
            self._h2_reset(event.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        try:
            request = parse_connect_request(event.headers or [])
        except HboneProtocolError as exc:
            log.info("bad HBONE request from %s: %s", self.peer, exc)
            if not self._h2_closed():
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self._h2.send_headers(
                        event.stream_id, build_response(Status.BAD_REQUEST), end_stream=True
                    )
            return
        stream = HboneStream(self, event.stream_id, request, self.peer)
        self._add_stream(stream)
        # The handler is the task's coroutine, cleaned up after by `_served`: no wrapping
        # coroutine frame kept for the connection's life.
        task = asyncio.ensure_future(self._handler(stream, request, self.peer))
        self._tasks[stream] = task
        task.add_done_callback(functools.partial(self._served, stream))

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None and not stream._responded and stream._error is None:
            # RFC 9113 §8.5: no DATA before the 2xx; those bytes must never reach the app.
            if not self._h2_closed():
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self._h2.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            self._h2_reset(event.stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._peer_failed(
                stream,
                HboneStreamReset(f"peer {self.peer} sent data on stream {event.stream_id} early"),
            )
            return
        super()._on_data(event)

    def _served(self, stream: HboneStream, task: asyncio.Future[None]) -> None:
        """The handler's task ended (also if cancelled before it started): log its error,
        answer 503 if it never answered, release the stream."""
        self._tasks.pop(stream, None)
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            pass
        elif exc is stream._error:  # the handler stopped because the stream failed
            log.debug("HBONE stream %s from %s ended: %s", stream.request, stream.peer, exc)
        else:
            log.error(
                "HBONE handler failed for %s from %s",
                stream.request.authority,
                stream.peer,
                exc_info=exc,
            )
        if not stream._responded and stream._error is None and not self._closing:
            stream.refuse(Status.UPSTREAM_UNREACHABLE)
        stream.close()


def server_factory(
    handler: Handler, *, tls: ssl.SSLContext, limits: HboneLimits = DEFAULT_LIMITS
) -> Callable[[], HboneServerProtocol]:
    """A protocol factory for `loop.create_server` (without ``ssl=``: TLS is the protocol's)."""
    return lambda: HboneServerProtocol(handler, tls=tls, limits=limits)


async def serve(
    sock: socket.socket,
    ssl_context: ssl.SSLContext,
    handler: Handler,
    *,
    limits: HboneLimits = DEFAULT_LIMITS,
    **kwargs: Any,
) -> asyncio.Server:
    """Serve HBONE on a caller-made listening socket (e.g. bound inside a pod's netns).

    Extra keyword arguments go to `loop.create_server`; the TLS handshake is bounded by
    `limits.handshake_timeout`.
    """
    return await asyncio.get_running_loop().create_server(
        server_factory(handler, tls=ssl_context, limits=limits), sock=sock, **kwargs
    )
