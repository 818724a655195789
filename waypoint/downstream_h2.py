"""The HTTP/2 server inside a tunnel (prior knowledge, as gRPC clients and ztunnel-captured
h2c speak it): each stream becomes a `Request` for the request path, its `Response` goes
back with trailers (gRPC status lives there)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from mesh.hbone.relay import Duplex
from waypoint import headers as h
from waypoint.h2io import H2Connection, H2Stream, H2StreamError
from waypoint.message import Request, Response, empty

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


async def serve_h2(duplex: Duplex, handler: Handler, initial: bytes = b"") -> None:
    """Serve until the client closes the connection; streams run as tasks."""
    tasks: set[asyncio.Task[None]] = set()

    def on_request(stream: H2Stream) -> None:
        task = asyncio.get_running_loop().create_task(_serve_stream(stream, handler))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    conn = H2Connection(duplex, client=False, on_request=on_request)
    try:
        await conn.run(initial)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def request_from(stream: H2Stream) -> Request | None:
    """The request on `stream`, None if its pseudo-headers are unusable."""
    pseudo: dict[str, str] = {}
    regular: list[tuple[str, str]] = []
    for name, value in stream.head.result():
        if name.startswith(":"):
            pseudo[name] = value
        else:
            regular.append((name, value))
    method, path = pseudo.get(":method"), pseudo.get(":path")
    if not method or not path or method == "CONNECT":
        return None
    authority = pseudo.get(":authority") or h.get(regular, "host") or ""
    return Request(
        method=method,
        scheme=pseudo.get(":scheme", "http"),
        authority=authority,
        path=path,
        headers=h.end_to_end(regular),
        body=empty() if stream.finished else stream,
        protocol="HTTP/2",
        accepts_trailers=True,
    )


async def _serve_stream(stream: H2Stream, handler: Handler) -> None:
    request = request_from(stream)
    if request is None:
        stream.send_headers([(":status", "400")], end_stream=True)
        return
    response = await handler(request)
    sent = 0
    error: BaseException | None = None
    try:
        sent = await send_response(stream, response)
    except H2StreamError as exc:
        error = exc
        log.debug("HTTP/2 stream %d ended early: %s", stream.stream_id, exc)
    except BaseException as exc:
        error = exc
        raise
    finally:
        response.body.close()
        stream.close()
        response.complete(sent, error)


async def send_response(stream: H2Stream, response: Response) -> int:
    headers = [(":status", str(response.status)), *response.headers]
    length = response.body.length
    if length is not None:
        headers.append(("content-length", str(length)))
    if length == 0 and not response.body.trailers:
        stream.send_headers(headers, end_stream=True)
        while await response.body.read():
            pass
        return 0
    stream.send_headers(headers)
    return await stream.send_body(response.body)
