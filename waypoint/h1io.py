"""HTTP/1 over a byte duplex: events pulled from the wire only as fast as they are consumed
(a body is read from the peer chunk by chunk, never buffered whole), and bodies written
with the framing the head announced."""

from __future__ import annotations

import collections

from mesh.hbone.relay import Duplex
from waypoint.headers import Headers
from waypoint.http1 import (
    Data,
    End,
    Event,
    H1Error,
    H1Parser,
    Upgraded,
    encode_chunk,
    encode_last_chunk,
)
from waypoint.message import Body

READ_SIZE = 64 * 1024


class H1Reader:
    """Feeds `parser` from `duplex` on demand; `next()` returns one event at a time."""

    def __init__(self, duplex: Duplex, parser: H1Parser, initial: bytes = b"") -> None:
        self.duplex = duplex
        self.parser = parser
        self._pending = initial
        self._events: collections.deque[Event] = collections.deque()
        self.at_eof = False

    @property
    def buffered(self) -> bool:
        """Events or bytes already received and not consumed."""
        return bool(self._events or self._pending)

    async def wait_data(self) -> bool:
        """Until part of the next message is here; False once the peer closed instead."""
        if self._events or self._pending:
            return True
        if self.at_eof:
            return False
        data = await self.duplex.read(READ_SIZE)
        if not data:
            self.at_eof = True
            self._events.extend(self.parser.eof())
            return bool(self._events)
        self._pending = data
        return True

    async def next(self) -> Event | None:
        """The next event; None once the peer closed between messages."""
        while not self._events:
            if self._pending:
                data, self._pending = self._pending, b""
            elif self.at_eof:
                return None
            else:
                data = await self.duplex.read(READ_SIZE)
                if not data:
                    self.at_eof = True
                    self._events.extend(self.parser.eof())
                    continue
            self._events.extend(self.parser.feed(data))
        return self._events.popleft()

    def take_upgrade_rest(self) -> bytes:
        """After an upgrade head: the non-HTTP bytes received with it."""
        while self._events:
            event = self._events.popleft()
            if isinstance(event, Upgraded):
                return event.rest
        return b""


class H1Body:
    """A message body pulled from an `H1Reader` (Data events until End). Even an empty
    body is read to its End event, which leaves the reader at the next message."""

    def __init__(self, reader: H1Reader, length: int | None) -> None:
        self._reader = reader
        self._length = length
        self._trailers: Headers = []
        self.finished = False

    @property
    def length(self) -> int | None:
        return self._length

    async def read(self) -> bytes:
        if self.finished:
            return b""
        event = await self._reader.next()
        if isinstance(event, Data):
            return event.data
        if isinstance(event, End):
            self._trailers = event.trailers
            self.finished = True
            self._on_end()
            return b""
        if event is None:
            raise H1Error("connection closed in the middle of a body", 502)
        raise H1Error(f"unexpected {type(event).__name__} inside a body")

    def _on_end(self) -> None:
        """Hook for subclasses: the body has been read to its end."""

    @property
    def trailers(self) -> Headers:
        return self._trailers

    def close(self) -> None:
        """Nothing to release here: the connection decides whether it can be reused."""

    async def settle(self) -> bool:
        """After the exchange: consume an End already received (an empty body nobody read).
        True if the body is finished, so the connection may carry another message."""
        if not self.finished and self._length == 0 and self._reader.buffered:
            await self.read()
        return self.finished


async def write_body(
    duplex: Duplex, body: Body, *, chunked: bool, send_trailers: bool = False
) -> int:
    """Copy `body` to `duplex` (chunked or as is), waiting for each chunk to drain.
    Returns the body bytes written."""
    sent = 0
    while chunk := await body.read():
        duplex.write(encode_chunk(chunk) if chunked else chunk)
        sent += len(chunk)
        await duplex.drain()
    if chunked:
        duplex.write(encode_last_chunk(body.trailers if send_trailers else None))
        await duplex.drain()
    return sent


class PrefixedDuplex:
    """A duplex whose first reads return bytes already taken from it (sniffed, or read past
    an upgrade's head)."""

    def __init__(self, inner: Duplex, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def read(self, max_bytes: int) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return data
        return await self._inner.read(max_bytes)

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    async def drain(self) -> None:
        await self._inner.drain()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def close(self) -> None:
        self._inner.close()
