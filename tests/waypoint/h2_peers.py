"""HTTP/2 peers for the waypoint tests, written on the raw h2 state machine (not the
waypoint's own HTTP/2 code): an endpoint app (gRPC-style: echo with trailers, or N bytes)
and a client, each over an HBONE tunnel."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

from mesh.hbone.connection import HboneStream
from tests.waypoint.rig import TIMEOUT, Pod, Seen


@dataclass
class _Out:
    data: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    ended: bool = False


def _pump(conn: h2.connection.H2Connection, outs: dict[int, _Out]) -> None:
    """Send what the windows allow of each stream's pending bytes, then its trailers."""
    for sid, out in list(outs.items()):
        while out.data:
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                break
            conn.send_data(sid, out.data[:window])
            out.data = out.data[window:]
        if not out.data and not out.ended:
            if out.trailers:
                conn.send_headers(sid, out.trailers, end_stream=True)
            else:
                conn.end_stream(sid)
            out.ended = True
            del outs[sid]


def h2_app(pod: Pod) -> None:
    """Give `pod` an HTTP/2 app: `/bytes/N` answers N bytes; anything else echoes the
    request body with gRPC-like trailers (grpc-status 0, or the x-grpc-status asked for)."""

    async def serve(stream: HboneStream, first: bytes) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        conn = h2.connection.H2Connection(config)
        conn.initiate_connection()
        requests: dict[int, dict[str, str]] = {}
        bodies: dict[int, list[bytes]] = {}
        outs: dict[int, _Out] = {}
        data = first
        while data:
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    requests[event.stream_id] = dict(event.headers)  # type: ignore[arg-type]
                    bodies[event.stream_id] = []
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    bodies[event.stream_id].append(event.data)
                elif isinstance(event, h2.events.StreamEnded):
                    sid = event.stream_id
                    headers, body = requests[sid], b"".join(bodies.pop(sid))
                    pod.seen.append(
                        Seen(pod.name, headers[":method"], headers[":path"], headers, len(body), 0)
                    )
                    outs[sid] = _respond(conn, sid, pod.name, headers, body)
            _pump(conn, outs)
            stream.write(conn.data_to_send())
            await stream.drain()
            data = await stream.read(65536)
        stream.write_eof()

    pod.h2_handler = serve


def _respond(
    conn: h2.connection.H2Connection, sid: int, name: str, headers: dict[str, str], body: bytes
) -> _Out:
    path = headers[":path"]
    if path.startswith("/bytes/"):
        conn.send_headers(sid, [(":status", "200"), ("x-pod", name)])
        return _Out(b"x" * int(path.split("/")[2]))
    status = headers.get("x-grpc-status", "0")
    conn.send_headers(
        sid, [(":status", "200"), ("content-type", "application/grpc"), ("x-pod", name)]
    )
    return _Out(body, [("grpc-status", status), ("grpc-message", "done")])


@dataclass
class H2Result:
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str]


class H2Client:
    """One request at a time over a tunnel to the waypoint."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.stream.write(self.conn.data_to_send())

    async def request(
        self,
        path: str,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        *,
        read_limit: int | None = None,
    ) -> H2Result:
        """`read_limit`: stop after that many body bytes (the rest stays unread)."""
        conn = self.conn
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [
                (":method", "POST" if body else "GET"),
                (":scheme", "http"),
                (":authority", "reviews.demo.svc.cluster.local"),
                (":path", path),
                ("te", "trailers"),
                *(headers or []),
            ],
            end_stream=not body,
        )
        outs = {sid: _Out(body)} if body else {}
        result = H2Result({}, b"", {})
        received: list[bytes] = []
        size = 0
        done = False
        async with asyncio.timeout(TIMEOUT * 3):
            while not done:
                _pump(conn, outs)
                self.stream.write(conn.data_to_send())
                await self.stream.drain()
                data = await self.stream.read(1 << 20)
                assert data, "waypoint closed the HTTP/2 connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        result.headers = dict(event.headers)  # type: ignore[arg-type]
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, sid)
                        received.append(event.data)
                        size += len(event.data)
                    elif isinstance(event, h2.events.TrailersReceived):
                        result.trailers = dict(event.headers)  # type: ignore[arg-type]
                    elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                        done = True
                if read_limit is not None and size >= read_limit:
                    break
        self.stream.write(conn.data_to_send())
        result.body = b"".join(received)
        return result
