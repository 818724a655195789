"""HTTP/2 to endpoints, for requests that came in over HTTP/2 (gRPC needs it end to end:
trailers): one HTTP/2 connection per endpoint, over one HBONE tunnel, multiplexing every
request to that endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from mesh.hbone.connection import HboneStream
from waypoint.h2io import H2Connection, H2Stream, H2StreamError
from waypoint.message import Body, Request, Response
from waypoint.upstream import Endpoint, Tunnels, reset_failure

log = logging.getLogger(__name__)


class H2Upstreams:
    def __init__(self, tunnels: Tunnels) -> None:
        self._tunnels = tunnels
        self._conns: dict[Endpoint, H2Connection] = {}
        self._connecting: dict[Endpoint, asyncio.Task[H2Connection]] = {}
        self._runs: set[asyncio.Task[None]] = set()

    async def connection(self, endpoint: Endpoint) -> H2Connection:
        conn = self._conns.get(endpoint)
        if conn is not None and conn.usable:
            return conn
        task = self._connecting.get(endpoint)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(endpoint))
            self._connecting[endpoint] = task
            task.add_done_callback(lambda _: self._connecting.pop(endpoint, None))
        return await asyncio.shield(task)

    async def _connect(self, endpoint: Endpoint) -> H2Connection:
        tunnel = await self._tunnels.open(endpoint)
        conn = H2Connection(tunnel, client=True)
        run = asyncio.get_running_loop().create_task(self._run(endpoint, conn, tunnel))
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)
        self._conns[endpoint] = conn
        return conn

    async def _run(self, endpoint: Endpoint, conn: H2Connection, tunnel: HboneStream) -> None:
        try:
            await conn.run()
        finally:
            if self._conns.get(endpoint) is conn:
                del self._conns[endpoint]
            tunnel.close()

    async def send(self, endpoint: Endpoint, request: Request, body: Body) -> Response:
        conn = await self.connection(endpoint)
        headers = [
            (":method", request.method),
            (":scheme", request.scheme),
            (":authority", request.authority),
            (":path", request.path),
            *request.headers,
        ]
        if request.accepts_trailers:
            headers.append(("te", "trailers"))
        length = body.length
        if length:
            headers.append(("content-length", str(length)))
        upload: asyncio.Task[int] | None = None
        try:
            stream = await conn.request(headers, end_stream=length == 0)
            if length != 0:
                upload = asyncio.get_running_loop().create_task(stream.send_body(body))
                upload.add_done_callback(lambda t: _upload_done(t, stream))
            head = await stream.head
        except H2StreamError as exc:
            if upload is not None:
                upload.cancel()
            raise reset_failure(exc, endpoint) from exc
        status = 0
        regular = []
        for name, value in head:
            if name == ":status":
                status = int(value)
            elif not name.startswith(":"):
                regular.append((name, value))
        return Response(status, regular, _ResponseBody(stream, upload))

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(ConnectionError, OSError):
                conn.close()
        for run in self._runs:
            run.cancel()


def _upload_done(task: asyncio.Task[int], stream: H2Stream) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("request body upstream failed: %s", task.exception())
        stream.reset()


class _ResponseBody:
    """The upstream stream as a response `Body`; closing it early resets the stream."""

    def __init__(self, stream: H2Stream, upload: asyncio.Task[int] | None) -> None:
        self._stream = stream
        self._upload = upload

    @property
    def length(self) -> int | None:
        return self._stream.length

    async def read(self) -> bytes:
        return await self._stream.read()

    @property
    def trailers(self) -> list[tuple[str, str]]:
        return self._stream.trailers

    def close(self) -> None:
        if not self._stream.finished and self._upload is not None:
            self._upload.cancel()
        self._stream.close()
