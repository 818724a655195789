"""HTTP/1.1 message framing without I/O: httptools (llhttp) turned into a list of events
per `feed`, and the bytes we write (heads, chunked bodies, trailers).

Socket-free so keep-alive, chunked bodies, trailers, `Expect`, upgrades and the parser's
limits are tested byte for byte; the connection code only moves bytes and events.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import httptools

from waypoint.headers import Headers

# A head (request line or status line plus headers) longer than this is refused (431/502).
MAX_HEAD_BYTES = 64 * 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Header names already found to be tokens, up to SENDABLE_NAMES_KEPT of them.
_SENDABLE_NAMES: set[str] = set()
SENDABLE_NAMES_KEPT = 1024
_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class H1Error(Exception):
    """Bytes that are not a valid HTTP/1.x message (or exceed our limits)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class RequestHead:
    method: str
    target: str
    version: str
    headers: Headers
    keep_alive: bool
    # llhttp's verdict: Connection: upgrade with an Upgrade header, or CONNECT.
    upgrade: bool


@dataclass
class ResponseHead:
    status: int
    reason: str
    version: str
    headers: Headers
    keep_alive: bool


@dataclass
class Data:
    data: bytes


@dataclass
class End:
    trailers: Headers = field(default_factory=list)


@dataclass
class Upgraded:
    """The head of an upgrade was parsed; `rest` is what followed it (not HTTP)."""

    rest: bytes


Event = RequestHead | ResponseHead | Data | End | Upgraded


class _Collector:
    """httptools' callbacks, appending events.

    Holds its H1Parser weakly: H1Parser -> httptools parser -> these bound methods -> the
    H1Parser was a reference cycle, left for the garbage collector once per upstream
    exchange (~15 objects a request, gc 4-9 % of the waypoint's time under load)."""

    def __init__(self, parser: H1Parser) -> None:
        self._p = weakref.proxy(parser)

    def on_message_begin(self) -> None:
        self._p._begin()

    def on_url(self, url: bytes) -> None:
        self._p._count(len(url))
        self._p._url += url

    def on_status(self, status: bytes) -> None:
        self._p._count(len(status))
        self._p._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._p._count(len(name) + len(value) + 4)
        pair = (name.decode("latin-1").lower(), value.decode("latin-1"))
        if self._p._head_done:
            self._p._trailers.append(pair)
        else:
            self._p._headers.append(pair)

    def on_headers_complete(self) -> None:
        self._p._headers_complete()

    def on_body(self, body: bytes) -> None:
        if body:
            self._p._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._p._complete()


class H1Parser:
    """Incremental parser for a stream of requests (server side) or responses (client).

    `feed(data)` returns the events the bytes completed, in order; several messages may
    come out of one feed (pipelining). A response to HEAD has no body whatever its
    headers say: call `expect_head_response()` before feeding it.
    """

    def __init__(self, *, requests: bool) -> None:
        self._requests = requests
        collector = _Collector(self)
        self._parser: httptools.HttpRequestParser | httptools.HttpResponseParser = (
            httptools.HttpRequestParser(collector)
            if requests
            else httptools.HttpResponseParser(collector)
        )
        self._events: list[Event] = []
        self._head_bytes = 0
        self._url = b""
        self._reason = b""
        self._headers: Headers = []
        self._trailers: Headers = []
        self._head_done = False
        self._in_message = False
        self._skip_body = False
        self._head_response = False
        self._close_delimited = False
        self.upgraded = False

    @property
    def in_message(self) -> bool:
        """A message has begun and not ended (EOF now would truncate it)."""
        return self._in_message

    def expect_head_response(self) -> None:
        self._head_response = True

    def feed(self, data: bytes) -> list[Event]:
        if self.upgraded:
            raise H1Error("feed after an upgrade: the rest is not HTTP")
        if self._skip_body:
            return []  # bytes after a HEAD response's head: the upstream broke the protocol
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = True
            self._in_message = False
            self._events.append(Upgraded(data[upgrade.args[0] :]))
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, H1Error):
                raise exc.__context__ from None
            raise H1Error(f"malformed HTTP/1 message: {exc}") from None
        events, self._events = self._events, []
        return events

    def eof(self) -> list[Event]:
        """The peer closed: ends a close-delimited response; otherwise truncation."""
        if not self._in_message:
            return []
        if self._close_delimited and self._head_done:
            self._in_message = False
            return [End()]
        raise H1Error("connection closed in the middle of a message", 502)

    def _begin(self) -> None:
        self._in_message = True
        self._head_done = False
        self._head_bytes = 0
        self._url = b""
        self._reason = b""
        self._headers = []
        self._trailers = []
        self._close_delimited = False

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > MAX_HEAD_BYTES:
            raise H1Error(f"header section larger than {MAX_HEAD_BYTES} bytes", 431)

    def _headers_complete(self) -> None:
        self._head_done = True
        parser = self._parser
        version = parser.get_http_version()
        keep_alive = parser.should_keep_alive()
        if isinstance(parser, httptools.HttpRequestParser):
            self._events.append(
                RequestHead(
                    parser.get_method().decode("ascii"),
                    self._url.decode("latin-1"),
                    version,
                    self._headers,
                    keep_alive,
                    parser.should_upgrade(),
                )
            )
            return
        status = parser.get_status_code()
        self._close_delimited = not keep_alive and not _has_framing(self._headers)
        self._events.append(
            ResponseHead(status, self._reason.decode("latin-1"), version, self._headers, keep_alive)
        )
        if self._head_response and status >= 200:
            # llhttp cannot be told to skip the body; the next response needs a new parser.
            self._skip_body = True
            self._in_message = False
            self._events.append(End())

    def _complete(self) -> None:
        if self._skip_body:
            return
        self._in_message = False
        self._events.append(End(self._trailers))


def _has_framing(headers: Headers) -> bool:
    return any(n in ("content-length", "transfer-encoding") for n, _ in headers)


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def _head_lines(first: str, headers: Headers) -> bytes:
    """Names are checked once each (they repeat: a set lookup instead of a regex per
    header), values every time, without a regex (a quarter of the time for a typical head)."""
    lines = [first]
    for name, value in headers:
        if name not in _SENDABLE_NAMES:
            if not _TOKEN.fullmatch(name):
                raise H1Error(f"header {name[:100]!r} cannot be sent in HTTP/1", 502)
            if len(_SENDABLE_NAMES) < SENDABLE_NAMES_KEPT:
                _SENDABLE_NAMES.add(name)
        if "\r" in value or "\n" in value or "\x00" in value:
            raise H1Error(f"header {name[:100]!r} cannot be sent in HTTP/1", 502)
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("latin-1", "replace")


def encode_request_head(method: str, target: str, headers: Headers) -> bytes:
    return _head_lines(f"{method} {target} HTTP/1.1", headers)


def encode_response_head(status: int, headers: Headers, reason: str = "") -> bytes:
    return _head_lines(f"HTTP/1.1 {status} {reason or reason_phrase(status)}", headers)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_last_chunk(trailers: Headers | None = None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + _head_lines("", trailers)[2:]


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
