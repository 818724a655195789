"""Requests and responses as the proxy core sees them, whatever HTTP version carried them:
a head and a streamed body (chunks, then trailers). The connection code turns wire bytes
into these and back; the request path never sees framing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mesh.hbone.relay import Duplex
from waypoint.flags import ResponseFlag
from waypoint.headers import Headers

# A request body up to this size is kept while it is sent, so a retry or a mirror can
# send it again; a longer one is streamed once and not retried (Envoy's buffer limit idea).
REPLAY_LIMIT = 64 * 1024


class Body(Protocol):
    """A message body read once, chunk by chunk."""

    @property
    def length(self) -> int | None:
        """The exact length if known up front (0: no body), else None."""

    async def read(self) -> bytes:
        """The next chunk; b"" at the end (then `trailers` is final)."""

    @property
    def trailers(self) -> Headers: ...

    def close(self) -> None:
        """The reader is done (at the end, or abandoning the rest)."""


class BytesBody:
    """A body held in memory: direct responses, local replies, tests."""

    def __init__(self, data: bytes = b"", trailers: Headers | None = None) -> None:
        self._data = data
        self._done = not data
        self._trailers = trailers or []

    @property
    def length(self) -> int | None:
        return len(self._data)

    async def read(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        return self._data

    @property
    def trailers(self) -> Headers:
        return self._trailers

    def close(self) -> None:
        self._done = True


def empty() -> BytesBody:
    return BytesBody()


@dataclass
class Request:
    method: str
    scheme: str
    authority: str
    # Path and query as sent (origin form).
    path: str
    # End to end only (no hop-by-hop, no Host, no framing), names lower case.
    headers: Headers
    body: Body
    # "HTTP/1.1", "HTTP/1.0" or "HTTP/2" (downstream), for metrics and upstream choice.
    protocol: str = "HTTP/1.1"
    # The client asked for trailers (TE: trailers) and its connection can carry them.
    accepts_trailers: bool = False
    # An HTTP/1 upgrade (e.g. "websocket"), passed through after a 101.
    upgrade: str | None = None


@dataclass
class Response:
    status: int
    headers: Headers
    body: Body = field(default_factory=empty)
    # Envoy's response flags (UT, UO, NR, ...) for metrics and the access log.
    flags: list[ResponseFlag] = field(default_factory=list)
    # Envoy's %RESPONSE_CODE_DETAILS% where the waypoint answered itself for a reason worth
    # naming (which policy denied).
    details: str = ""
    # The endpoint ("ip:port") and workload uid of the last attempt, and how many were made.
    upstream: str = ""
    upstream_uid: str = ""
    attempts: int = 0
    # A 101 to an upgrade: the upstream bytes after the head, to relay as is.
    upgraded: Duplex | None = None
    # Called once the response went out (or failed): body bytes sent, the error if any.
    on_complete: Callable[[int, BaseException | None], None] | None = None

    def complete(self, sent: int, error: BaseException | None) -> None:
        callback, self.on_complete = self.on_complete, None
        if callback is not None:
            callback(sent, error)

    def then(self, callback: Callable[[int, BaseException | None], None]) -> None:
        """Run `callback` after those already registered, once the response is out."""
        previous = self.on_complete

        def both(sent: int, error: BaseException | None) -> None:
            if previous is not None:
                previous(sent, error)
            callback(sent, error)

        self.on_complete = both


class ReplayableBody:
    """Records the first `limit` bytes of a body as they are read, so the same body can be
    read again from the start (a retry, a mirror) as long as it fit.

    Readers take turns: each `reader()` starts at byte 0 and continues from the source once
    past what was recorded. Only one reader may be active at a time (a retry begins after
    the attempt before it ended).
    """

    def __init__(self, source: Body, limit: int = REPLAY_LIMIT) -> None:
        self._source = source
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._source_done = False
        self.overflowed = False
        self.complete: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    def reader(self) -> ReplayReader:
        if self.overflowed:
            raise RuntimeError("body exceeded the replay limit")
        return ReplayReader(self)

    async def _pull(self) -> bytes:
        if self._source_done:
            return b""
        try:
            chunk = await self._source.read()
        except BaseException:
            self._settle(False)
            raise
        if not chunk:
            self._source_done = True
            self._settle(not self.overflowed)
        elif not self.overflowed:
            if self._size + len(chunk) > self._limit:
                self.overflowed = True
                self._chunks.clear()
                self._settle(False)
            else:
                self._chunks.append(chunk)
                self._size += len(chunk)
        return chunk

    def _settle(self, ok: bool) -> None:
        if not self.complete.done():
            self.complete.set_result(ok)

    def recorded(self) -> bytes:
        """The whole body, once `complete` resolved True."""
        return b"".join(self._chunks)

    def close(self) -> None:
        self._settle(False)
        self._source.close()


class ReplayReader:
    def __init__(self, owner: ReplayableBody) -> None:
        self._owner = owner
        self._index = 0

    @property
    def length(self) -> int | None:
        return self._owner._source.length

    async def read(self) -> bytes:
        owner = self._owner
        if self._index < len(owner._chunks):
            self._index += 1
            return owner._chunks[self._index - 1]
        chunk = await owner._pull()
        if chunk and not owner.overflowed:
            self._index += 1
        return chunk

    @property
    def trailers(self) -> Headers:
        return self._owner._source.trailers

    def close(self) -> None:
        """An attempt is done with the body; the source stays open for the next one."""
