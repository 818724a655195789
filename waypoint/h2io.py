"""HTTP/2 (h2, sans-IO) over a byte duplex (an HBONE tunnel), for both ends: the server
inside a downstream tunnel and the client on an upstream one.

Memory stays bounded by flow control: received DATA is acknowledged to the peer only as
the reader consumes it (the peer can never have more than our window unread), and a
writer sends only within the peer's windows, draining the tunnel after each frame.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from mesh.hbone.relay import Duplex
from waypoint.headers import Headers
from waypoint.message import Body

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
# Per stream and per connection: what a peer may send us that nobody has read yet.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 1000
MAX_HEADER_LIST_SIZE = 64 * 1024


class H2StreamError(ConnectionResetError):
    """The stream was reset, or its connection went away."""

    def __init__(self, message: str, error_code: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code

    @property
    def refused(self) -> bool:
        return self.error_code == ErrorCodes.REFUSED_STREAM


class H2Stream:
    """One request/response stream; also the `Body` of what the peer sends on it."""

    def __init__(self, conn: H2Connection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[Headers] = loop.create_future()
        self._recv: collections.deque[tuple[bytes, int]] = collections.deque()
        self._recv_eof = False
        self._trailers: Headers = []
        self._error: H2StreamError | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._window_waiter: asyncio.Future[None] | None = None
        self._send_closed = False
        self.received = 0

    # -- the received body ---------------------------------------------------------

    @property
    def length(self) -> int | None:
        if self._recv_eof and not self._recv:
            return 0
        if not self.head.done() or self.head.exception() is not None:
            return None
        for name, value in self.head.result():
            if name == "content-length" and value.isdigit():
                return int(value)
        return None

    async def read(self) -> bytes:
        while not self._recv and not self._recv_eof and self._error is None:
            self._read_waiter = asyncio.get_running_loop().create_future()
            await self._read_waiter
        if self._recv:
            data, flow = self._recv.popleft()
            self._conn._consumed(self, flow)
            return data
        if self._error is not None and not self._recv_eof:
            raise self._error
        return b""

    @property
    def trailers(self) -> Headers:
        return self._trailers

    @property
    def finished(self) -> bool:
        return self._recv_eof and not self._recv

    def close(self) -> None:
        """Done with the stream: reset it unless both directions ended."""
        if self._error is None and not (self._recv_eof and self._send_closed):
            self.reset(ErrorCodes.CANCEL)

    # -- sending -------------------------------------------------------------------

    def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None:
        self._check()
        self._conn._send_headers(self, headers, end_stream)
        if end_stream:
            self._send_closed = True

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        """Within the peer's windows, in frames, draining the tunnel after each."""
        conn = self._conn
        while True:
            self._check()
            window = conn._window(self)
            if window <= 0 and data:
                self._window_waiter = asyncio.get_running_loop().create_future()
                await self._window_waiter
                continue
            chunk, data = data[:window], data[window:]
            conn._send_data(self, chunk, end_stream and not data)
            await conn._drain()
            if not data:
                break
        if end_stream:
            self._send_closed = True

    async def send_body(self, body: Body, *, trailers: bool = True) -> int:
        """Stream `body` and end the stream (with its trailers if any and wanted)."""
        sent = 0
        pending = await body.read()
        while pending:
            following = await body.read()
            last = not following
            await self.send_data(pending, end_stream=last and not (trailers and body.trailers))
            sent += len(pending)
            pending = following
        if trailers and body.trailers:
            self.send_headers(body.trailers, end_stream=True)
        elif not self._send_closed:
            await self.send_data(b"", end_stream=True)
        return sent

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        if self._error is None:
            self._conn._reset(self, code)
            self._fail(H2StreamError(f"stream {self.stream_id} reset locally", code))

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, error: H2StreamError) -> None:
        if self._error is None:
            self._error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()
        unread = sum(flow for _, flow in self._recv)
        self._recv.clear()
        if unread:
            self._conn._consumed(self, unread)
        self._wake()

    def _wake(self) -> None:
        for waiter in (self._read_waiter, self._window_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


OnRequest = Callable[["H2Stream"], None]


class H2Connection:
    """`run()` reads the duplex until it closes; a server calls `on_request(stream)` for
    each new request (headers in `stream.head`), a client opens streams with `request()`."""

    def __init__(
        self, duplex: Duplex, *, client: bool, on_request: OnRequest | None = None
    ) -> None:
        self._duplex = duplex
        self._client = client
        self._on_request = on_request
        config = h2.config.H2Configuration(client_side=client, header_encoding="utf-8")
        self._h2 = h2.connection.H2Connection(config)
        self._streams: dict[int, H2Stream] = {}
        self._drain_lock = asyncio.Lock()
        self._closed: BaseException | None = None
        self.goaway = False

    @property
    def usable(self) -> bool:
        return self._closed is None and not self.goaway

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    async def run(self, initial: bytes = b"") -> None:
        settings = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
        }
        if self._client:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        self._h2.local_settings = h2.settings.Settings(self._client, settings)
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        error: BaseException | None = None
        try:
            data = initial
            while True:
                if data:
                    self._receive(data)
                if self._closed is not None:
                    break
                data = await self._duplex.read(READ_SIZE)
                if not data:
                    break
        except (ConnectionError, OSError, h2.exceptions.ProtocolError) as exc:
            error = exc
        finally:
            self._close_all(error or ConnectionResetError("HTTP/2 connection closed"))
            with contextlib.suppress(ConnectionError, OSError):
                self._flush()
                self._duplex.write_eof()

    def close(self) -> None:
        """GOAWAY; `run()` ends when the peer closes its side."""
        if self._closed is None:
            self._h2.close_connection()
            self._flush()
            self._duplex.write_eof()

    async def request(self, headers: Headers, *, end_stream: bool) -> H2Stream:
        if not self.usable:
            raise H2StreamError("HTTP/2 connection no longer takes requests")
        stream = H2Stream(self, self._h2.get_next_available_stream_id())
        self._streams[stream.stream_id] = stream
        stream.send_headers(headers, end_stream=end_stream)
        await self._drain()
        return stream

    def _receive(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("HTTP/2 peer broke the protocol: %s", exc)
            self._flush()
            self._closed = exc
            return
        for event in events:
            self._dispatch(event)
        self._flush()

    def _dispatch(self, event: h2.events.Event) -> None:
        stream = self._streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.RequestReceived):
            self._on_request_received(event)
        elif isinstance(event, h2.events.ResponseReceived):
            if stream is not None and not stream.head.done():
                stream.head.set_result(list(event.headers or []))  # type: ignore[arg-type]
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(stream, event)
        elif isinstance(event, h2.events.TrailersReceived):
            if stream is not None:
                stream._trailers = list(event.headers or [])  # type: ignore[arg-type]
        elif isinstance(event, h2.events.StreamEnded):
            if stream is not None:
                stream._recv_eof = True
                stream._wake()
                self._forget_if_done(stream)
        elif isinstance(event, h2.events.StreamReset):
            if stream is not None:
                code = int(event.error_code or 0)
                stream._fail(H2StreamError(f"peer reset stream {event.stream_id}", code))
                self._streams.pop(stream.stream_id, None)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            targets = [stream] if stream is not None else list(self._streams.values())
            for s in targets:
                s._wake()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = True
            last = event.last_stream_id or 0
            for s in list(self._streams.values()):
                if s.stream_id > last:
                    s._fail(H2StreamError("peer sent GOAWAY", ErrorCodes.REFUSED_STREAM))

    def _on_request_received(self, event: h2.events.RequestReceived) -> None:
        assert event.stream_id is not None
        stream = H2Stream(self, event.stream_id)
        stream.head.set_result(list(event.headers or []))  # type: ignore[arg-type]
        self._streams[stream.stream_id] = stream
        if event.stream_ended is not None:
            stream._recv_eof = True
        if self._on_request is not None:
            self._on_request(stream)

    def _on_data(self, stream: H2Stream | None, event: h2.events.DataReceived) -> None:
        flow = event.flow_controlled_length or 0
        if stream is None or stream._error is not None:
            self._h2.acknowledge_received_data(flow, event.stream_id or 0)
            return
        data = event.data or b""
        if data:
            stream._recv.append((data, flow))
            stream.received += len(data)
            stream._wake()
        elif flow:
            self._h2.acknowledge_received_data(flow, stream.stream_id)

    def _consumed(self, stream: H2Stream, flow: int) -> None:
        if self._closed is None and flow:
            with contextlib.suppress(h2.exceptions.StreamClosedError, KeyError):
                self._h2.acknowledge_received_data(flow, stream.stream_id)
            self._flush()

    def _window(self, stream: H2Stream) -> int:
        try:
            window = self._h2.local_flow_control_window(stream.stream_id)
        except h2.exceptions.StreamClosedError as exc:
            raise H2StreamError(f"stream {stream.stream_id} closed") from exc
        return min(window, self._h2.max_outbound_frame_size)

    def _send_headers(self, stream: H2Stream, headers: Headers, end_stream: bool) -> None:
        self._guard(lambda: self._h2.send_headers(stream.stream_id, headers, end_stream=end_stream))
        if end_stream:
            self._forget_if_done(stream)

    def _send_data(self, stream: H2Stream, data: bytes, end_stream: bool) -> None:
        self._guard(lambda: self._h2.send_data(stream.stream_id, data, end_stream=end_stream))
        if end_stream:
            stream._send_closed = True
            self._forget_if_done(stream)

    def _guard(self, action: Callable[[], None]) -> None:
        if self._closed is not None:
            raise H2StreamError(f"HTTP/2 connection closed: {self._closed}")
        try:
            action()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            raise H2StreamError(str(exc)) from exc
        self._flush()

    def _reset(self, stream: H2Stream, code: int) -> None:
        self._streams.pop(stream.stream_id, None)
        if self._closed is None:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self._h2.reset_stream(stream.stream_id, code)
            self._flush()

    def _forget_if_done(self, stream: H2Stream) -> None:
        if stream._recv_eof and stream._send_closed:
            self._streams.pop(stream.stream_id, None)

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data:
            self._duplex.write(data)

    async def _drain(self) -> None:
        """One drainer at a time: the tunnel wakes a single waiter."""
        async with self._drain_lock:
            await self._duplex.drain()

    def _close_all(self, error: BaseException) -> None:
        if self._closed is None:
            self._closed = error
        for stream in list(self._streams.values()):
            stream._fail(H2StreamError(f"HTTP/2 connection closed: {error}"))
        self._streams.clear()
