"""The HTTP/1.1 server inside a tunnel: requests parsed one after the other (keep-alive,
pipelined bytes kept for the next), each handed to the request path as a `Request` whose
body streams from the client, the response written with the framing the client speaks.

`Expect: 100-continue` is answered by us, when the request path first reads the body (so
a request refused without reading it never makes the client send it). An upgrade
(WebSocket) that the upstream accepts with 101 turns the tunnel into a byte relay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from mesh.hbone.protocol import HboneError
from mesh.hbone.relay import Duplex, relay
from waypoint import headers as h
from waypoint.h1io import H1Body, H1Reader, PrefixedDuplex, write_body
from waypoint.http1 import (
    CONTINUE,
    H1Error,
    H1Parser,
    RequestHead,
    encode_response_head,
)
from waypoint.message import BytesBody, Request, Response

log = logging.getLogger(__name__)

# What ends a response in the middle of its body.
_CUT = (TimeoutError, HboneError, OSError)

Handler = Callable[[Request], Awaitable[Response]]
# A keep-alive connection without a request for this long is closed (Envoy: 1 h).
IDLE_TIMEOUT = 3600.0
# From a request's first byte to the end of its head (Envoy's request_headers_timeout,
# which Envoy leaves off; 60 s as nginx's client_header_timeout, so a client sending its
# head byte by byte cannot hold a connection and its memory for the idle hour).
HEADERS_TIMEOUT = 60.0


class _RequestBody(H1Body):
    def __init__(self, reader: H1Reader, length: int | None, server: H1Server, expect: bool):
        super().__init__(reader, length)
        self._server = server
        self._expect = expect

    async def read(self) -> bytes:
        if self._expect:
            self._expect = False
            if not self._server.responding and not self.finished:
                self._server.duplex.write(CONTINUE)
        return await super().read()


def _local(status: int, text: str) -> Response:
    return Response(status, [("content-type", "text/plain")], BytesBody(text.encode()))


class H1Server:
    def __init__(
        self,
        duplex: Duplex,
        handler: Handler,
        initial: bytes = b"",
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        headers_timeout: float = HEADERS_TIMEOUT,
        closing: Callable[[], bool] = lambda: False,
    ) -> None:
        """`closing()` true: answer the next request with `Connection: close` (draining)."""
        self.duplex = duplex
        self._handler = handler
        self._reader = H1Reader(duplex, H1Parser(requests=True), initial)
        self._idle_timeout = idle_timeout
        self._headers_timeout = headers_timeout
        self._closing = closing
        self.responding = False

    async def run(self) -> None:
        """Serve until the client closes, asks to close, or something breaks framing."""
        try:
            while await self._serve_one():
                pass
        except _CUT as exc:
            # A response cut short (the upstream failed or timed out mid-body, or the
            # client went away): the client must not take it for complete.
            log.info("HTTP/1.1 response cut: %s", exc or type(exc).__name__)
            self.duplex.close()
            return
        self.duplex.write_eof()
        await self.duplex.drain()

    async def _serve_one(self) -> bool:
        try:
            async with asyncio.timeout(self._idle_timeout):
                if not await self._reader.wait_data():
                    return False
        except TimeoutError:
            return False
        try:
            async with asyncio.timeout(self._headers_timeout):
                event = await self._reader.next()
        except TimeoutError:
            log.info("request head not complete after %.0f s: 408", self._headers_timeout)
            await self._respond_error(408, "request headers not received in time")
            return False
        except H1Error as exc:
            await self._respond_error(exc.status, str(exc))
            return False
        if event is None:
            return False
        if not isinstance(event, RequestHead):
            return False
        request, body = self._request(event)
        if isinstance(request, Response):
            await self._respond_error(request.status, "")
            return False
        self.responding = False
        response = await self._handler(request)
        self.responding = True
        if response.status == 101 and response.upgraded is not None and request.upgrade:
            await self._switch(response)
            return False
        keep_alive = await self._write(response, event)
        finished = await body.settle()
        return keep_alive and finished and not self._reader.parser.upgraded

    def _request(self, head: RequestHead) -> tuple[Request | Response, H1Body]:
        host = h.get(head.headers, "host")
        target = head.target
        scheme = "http"
        if target.startswith(("http://", "https://")):
            parts = urlsplit(target)
            scheme, host = parts.scheme, parts.netloc
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
        chunked = "chunked" in h.tokens(head.headers, "transfer-encoding")
        length = None if chunked else (h.content_length(head.headers) or 0)
        expect = "100-continue" in h.tokens(head.headers, "expect") and head.version == "1.1"
        body = _RequestBody(self._reader, length, self, expect)
        if head.method == "CONNECT":
            return _local(405, "CONNECT is not proxied\n"), body
        if not host and head.version == "1.1":
            return _local(400, "missing Host\n"), body
        upgrade = None
        if head.upgrade and "upgrade" in h.tokens(head.headers, "connection"):
            upgrade = h.get(head.headers, "upgrade")
        request = Request(
            method=head.method,
            scheme=scheme,
            authority=host or "",
            path=target,
            headers=h.end_to_end(head.headers),
            body=body,
            protocol=f"HTTP/{head.version}",
            accepts_trailers="trailers" in h.tokens(head.headers, "te"),
            upgrade=upgrade,
        )
        return request, body

    async def _write(self, response: Response, head: RequestHead) -> bool:
        """Write `response`; whether the connection may carry another request."""
        sent, error = 0, None
        try:
            keep_alive, sent = await write_response(
                self.duplex,
                response,
                method=head.method,
                version=head.version,
                keep_alive=head.keep_alive and not head.upgrade and not self._closing(),
                trailers=head.version == "1.1" and "trailers" in h.tokens(head.headers, "te"),
            )
            return keep_alive
        except BaseException as exc:
            error = exc
            raise
        finally:
            response.body.close()
            response.complete(sent, error)

    async def _switch(self, response: Response) -> None:
        assert response.upgraded is not None
        headers = [*response.headers, ("connection", "upgrade")]
        self.duplex.write(encode_response_head(101, headers))
        client = PrefixedDuplex(self.duplex, self._reader.take_upgrade_rest())
        sent, error = 0, None
        try:
            _, sent = await relay(client, response.upgraded)
        except BaseException as exc:
            error = exc
            raise
        finally:
            response.complete(sent, error)

    async def _respond_error(self, status: int, text: str) -> None:
        self.duplex.write(
            encode_response_head(
                status,
                [("content-length", str(len(text))), ("connection", "close")],
            )
            + text.encode()
        )
        await self.duplex.drain()


async def write_response(
    duplex: Duplex,
    response: Response,
    *,
    method: str,
    version: str,
    keep_alive: bool,
    trailers: bool,
) -> tuple[bool, int]:
    """Head and body with HTTP/1.1 framing: Content-Length when known, else chunked
    (HTTP/1.1) or close-delimited (HTTP/1.0). Returns (keep-alive, body bytes sent)."""
    status = response.status
    headers = list(response.headers)
    bodyless = method == "HEAD" or status in (204, 304) or status < 200
    length = response.body.length
    chunked = False
    if bodyless:
        if method == "HEAD" and length is not None and status not in (204, 304):
            headers.append(("content-length", str(length)))
    elif length is not None:
        headers.append(("content-length", str(length)))
    elif version == "1.1":
        chunked = True
        headers.append(("transfer-encoding", "chunked"))
    else:
        keep_alive = False
    if not keep_alive:
        headers.append(("connection", "close"))
    elif version == "1.0":
        headers.append(("connection", "keep-alive"))
    duplex.write(encode_response_head(status, headers))
    if bodyless:
        while await response.body.read():
            pass  # a HEAD's or 204's body: read to its end (releases the upstream), not sent
        await duplex.drain()
        return keep_alive, 0
    sent = await write_body(duplex, response.body, chunked=chunked, send_trailers=trailers)
    return keep_alive, sent
