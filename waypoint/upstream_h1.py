"""One HTTP/1.1 request/response exchange with an endpoint over an HBONE tunnel, the
request body uploaded while the response streams back, and the tunnel handed back for
reuse only if both messages ended cleanly with keep-alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from mesh.hbone.connection import HboneStream
from waypoint import headers as h
from waypoint.h1io import H1Body, H1Reader, PrefixedDuplex, write_body
from waypoint.http1 import (
    H1Error,
    H1Parser,
    ResponseHead,
    encode_request_head,
)
from waypoint.message import Body, Request, Response
from waypoint.upstream import STREAM_ERRORS, Endpoint, reset_failure

log = logging.getLogger(__name__)

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
Release = Callable[["H1Exchange", bool], None]


class H1Exchange:
    """A request sent on `tunnel`; `send()` returns once the response head is in."""

    def __init__(self, tunnel: HboneStream, endpoint: Endpoint, release: Release) -> None:
        self.tunnel = tunnel
        self.endpoint = endpoint
        self._release = release
        self._reader = H1Reader(tunnel, H1Parser(requests=False))
        self._upload: asyncio.Task[int] | None = None
        self._keep_alive = False
        self._released = False
        self.upgraded: PrefixedDuplex | None = None

    async def send(self, req: Request, body: Body) -> Response:
        headers = [("host", req.authority), *req.headers]
        length = body.length
        if req.upgrade:
            headers += [("connection", "upgrade"), ("upgrade", req.upgrade)]
        if length is None:
            headers.append(("transfer-encoding", "chunked"))
        elif length or req.method in _BODY_METHODS:
            headers.append(("content-length", str(length)))
        if req.method == "HEAD":
            self._reader.parser.expect_head_response()
        try:
            self.tunnel.write(encode_request_head(req.method, req.path, headers))
            if length == 0:
                await self.tunnel.drain()
            else:
                self._upload = asyncio.get_running_loop().create_task(
                    write_body(self.tunnel, body, chunked=length is None)
                )
                self._upload.add_done_callback(self._upload_done)
            head = await self._read_head()
        except (*STREAM_ERRORS, H1Error) as exc:
            self.finish(False)
            raise reset_failure(exc, self.endpoint) from exc
        except BaseException:
            self.finish(False)
            raise
        return self._response(req, head)

    async def _read_head(self) -> ResponseHead:
        while True:
            event = await self._reader.next()
            if event is None:
                raise reset_failure(None, self.endpoint)
            if isinstance(event, ResponseHead) and not (100 <= event.status < 200):
                return event
            if isinstance(event, ResponseHead) and event.status == 101:
                return event
            # An interim response (100 Continue, 103) and its End: not forwarded.

    def _response(self, req: Request, head: ResponseHead) -> Response:
        self._keep_alive = head.keep_alive
        if head.status == 101:
            self.upgraded = PrefixedDuplex(self.tunnel, self._reader.take_upgrade_rest())
            self._keep_alive = False
            return Response(101, h.end_to_end(head.headers))
        declared = h.content_length(head.headers)
        if head.status in (204, 304):
            length: int | None = 0
        elif req.method == "HEAD":
            length = declared
        else:
            chunked = "chunked" in h.tokens(head.headers, "transfer-encoding")
            length = None if chunked else declared
        return Response(head.status, h.end_to_end(head.headers), _UpstreamBody(self, length))

    def _upload_done(self, task: asyncio.Task[int]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.debug("request body to %s failed: %s", self.endpoint.authority, exc)
            # The downstream went away mid-body, or the upstream stopped reading: abort.
            self.tunnel.reset()

    def finish(self, complete: bool) -> None:
        """The response was read to its end (`complete`) or abandoned; release the tunnel."""
        if self._released:
            return
        self._released = True
        upload_done = self._upload is None or self._upload.done()
        if self._upload is not None and not self._upload.done():
            self._upload.cancel()
        reusable = (
            complete
            and upload_done
            and self._keep_alive
            and not self._reader.buffered
            and not self._reader.at_eof
            and self.upgraded is None
        )
        if self._upload is not None and upload_done and not self._upload.cancelled():
            reusable = reusable and self._upload.exception() is None
        self._release(self, reusable)


class _UpstreamBody(H1Body):
    def __init__(self, exchange: H1Exchange, length: int | None) -> None:
        super().__init__(exchange._reader, length)
        self._exchange = exchange

    async def read(self) -> bytes:
        try:
            return await super().read()
        except (*STREAM_ERRORS, H1Error):
            self._exchange.finish(False)
            raise

    def _on_end(self) -> None:
        self._exchange.finish(True)

    def close(self) -> None:
        if not self.finished:
            self._exchange.finish(False)


async def wait_upload(exchange: H1Exchange) -> None:
    """Tests and shutdown: let a pending upload end."""
    if exchange._upload is not None:
        with contextlib.suppress(BaseException):
            await exchange._upload
