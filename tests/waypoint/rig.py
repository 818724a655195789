"""A real waypoint on loopback for tests: real certificates, real HBONE (mTLS, HTTP/2
CONNECT) in front of it and behind it, two endpoint "pods" at 127.0.0.2 and 127.0.0.3
(HBONE servers standing in for their ztunnels, serving an HTTP/1.1 test app written on
raw httptools callbacks, and an HTTP/2 app on raw h2), and a client that speaks HTTP/1.1
bytes through its own tunnel."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httptools
from prometheus_client import CollectorRegistry

from mesh.api import mesh_pb2
from mesh.hbone.connection import HboneClientConnection, HboneStream, serve
from mesh.hbone.protocol import ConnectRequest
from mesh.spiffe import SpiffeId
from mesh.tls import TlsIdentity, client_context, server_context
from tests.unit.certs import make_ca, make_leaf
from waypoint.server import Waypoint

# Short, so that the stalled-client test waits little; well under TIMEOUT.
HEADERS_TIMEOUT = 1.0
TIMEOUT = 10.0
WAYPOINT_ID = SpiffeId("cluster.local", "demo", "waypoint")
CLIENT_ID = SpiffeId("cluster.local", "demo", "sleep")
BACKEND_ID = SpiffeId("cluster.local", "demo", "reviews")
VIP = "10.96.0.10"
HOST = "reviews.demo.svc.cluster.local"
PORT = 80
TARGET_PORT = 8080
PODS = {"reviews-v1": "127.0.0.2", "reviews-v2": "127.0.0.3"}


def workload(name: str, address: str, sa: str, **labels: str) -> mesh_pb2.Resource:
    return mesh_pb2.Resource(
        key=f"Workload/demo/{name}",
        workload=mesh_pb2.Workload(
            uid=f"uid-{name}",
            name=name,
            namespace="demo",
            service_account=sa,
            addresses=[address],
            ambient=True,
            labels=labels,
            trust_domain="cluster.local",
        ),
    )


def base_resources() -> dict[str, mesh_pb2.Resource]:
    resources = [
        workload("reviews-v1", PODS["reviews-v1"], "reviews", app="reviews", version="v1"),
        workload("reviews-v2", PODS["reviews-v2"], "reviews", app="reviews", version="v2"),
        workload("sleep", "127.0.0.1", "sleep", app="sleep"),
        mesh_pb2.Resource(
            key="Service/demo/reviews",
            service=mesh_pb2.Service(
                name="reviews",
                namespace="demo",
                hostname=HOST,
                addresses=[VIP],
                ports=[mesh_pb2.ServicePort(port=PORT, target_port=TARGET_PORT, name="http")],
                endpoint_uids=["uid-reviews-v1", "uid-reviews-v2"],
                waypoint="demo/waypoint",
            ),
        ),
    ]
    return {r.key: r for r in resources}


def routes(*rules: mesh_pb2.HttpRouteRule, port: int = 0) -> mesh_pb2.Resource:
    return mesh_pb2.Resource(
        key="HttpRouteTable/demo/reviews",
        http_routes=mesh_pb2.HttpRouteTable(
            service=HOST, service_namespace="demo", port=port, rules=list(rules)
        ),
    )


def backend(subset: str = "", weight: int = 0) -> mesh_pb2.HttpBackend:
    labels = {"version": subset} if subset else {}
    return mesh_pb2.HttpBackend(service=HOST, subset=subset, subset_labels=labels, weight=weight)


@dataclass
class Seen:
    """What an endpoint app received."""

    pod: str
    method: str
    path: str
    headers: dict[str, str]
    body_bytes: int
    tunnel: int  # which HBONE stream (connection reuse shows as the same number)


class _AppProtocol:
    """httptools callbacks of the HTTP/1.1 test app, one request at a time."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = False
        self.head_done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


@dataclass
class Pod:
    """One endpoint: an HBONE server (its ztunnel) with the test app behind it."""

    name: str
    address: str
    seen: list[Seen] = field(default_factory=list)
    tunnels: int = 0
    # Answer every HTTP/1.1 request with this status (0: as the path says).
    override: int = 0
    # Response body bytes written so far (/bytes/N).
    body_sent: int = 0
    h2_handler: Callable[[HboneStream, bytes], Awaitable[None]] | None = None

    async def handle(self, stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        assert peer == WAYPOINT_ID, peer
        assert request.authority == f"{self.address}:{TARGET_PORT}", request.authority
        await stream.accept()
        self.tunnels += 1
        tunnel = self.tunnels
        first = await stream.read(65536)
        if first.startswith(b"PRI * HTTP/2.0") and self.h2_handler is not None:
            await self.h2_handler(stream, first)
            return
        if not first[:1].isupper():  # not HTTP: a TCP echo (upper-cased)
            await self._echo_upper(stream, first)
            return
        await self._serve_h1(stream, first, tunnel)

    async def _serve_h1(self, stream: HboneStream, data: bytes, tunnel: int) -> None:
        while True:
            proto = _AppProtocol()
            parser = httptools.HttpRequestParser(proto)
            upgrade_rest: bytes | None = None
            echo_started = stalled = False
            while not proto.done:
                if not data:
                    data = await stream.read(65536)
                    if not data:
                        stream.write_eof()
                        return
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade as exc:
                    upgrade_rest = data[exc.args[0] :]
                data = b""
                path = proto.url.decode()
                if proto.head_done and path.startswith("/stall") and not stalled:
                    stalled = True  # an app that stops reading its request body for a while
                    await asyncio.sleep(3)
                if proto.head_done and path.startswith("/echo") and not echo_started:
                    echo_started = True
                    stream.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                if echo_started:
                    for chunk in proto.body:
                        stream.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    proto.body.clear()
                    await stream.drain()
            headers = {n.decode().lower(): v.decode() for n, v in proto.headers}
            path = proto.url.decode()
            size = sum(len(b) for b in proto.body)
            self.seen.append(
                Seen(self.name, parser.get_method().decode(), path, headers, size, tunnel)
            )
            if upgrade_rest is not None:
                await self._websocket(stream, upgrade_rest)
                return
            if echo_started:
                stream.write(b"0\r\n\r\n")
                await stream.drain()
                continue
            await self._respond(stream, path, headers, size)
            if headers.get("connection", "").lower() == "close":
                stream.write_eof()
                return

    async def _respond(
        self, stream: HboneStream, path: str, headers: dict[str, str], size: int
    ) -> None:
        status = self.override or 200
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
        if path.startswith("/delay/"):
            await asyncio.sleep(int(path.split("/")[2]) / 1000)
        if path.startswith("/trickle/"):  # /trickle/<ms>/<pieces>: a slow, chunked body
            pause, pieces = (int(x) for x in path.split("/")[2:4])
            stream.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(pieces):
                await asyncio.sleep(pause / 1000)
                stream.write(b"5\r\npiece\r\n")
                await stream.drain()
            stream.write(b"0\r\n\r\n")
            await stream.drain()
            return
        if path.startswith("/bytes/"):
            total = int(path.split("/")[2])
            stream.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
            chunk = b"x" * 65536
            while total:
                piece = chunk[: min(total, len(chunk))]
                stream.write(piece)
                total -= len(piece)
                self.body_sent += len(piece)
                await stream.drain()
            return
        body = json.dumps(
            {"pod": self.name, "path": path, "headers": headers, "body_bytes": size}
        ).encode()
        stream.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"X-Pod: {self.name}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await stream.drain()

    @staticmethod
    async def _websocket(stream: HboneStream, rest: bytes) -> None:
        stream.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        await Pod._echo_upper(stream, rest)

    @staticmethod
    async def _echo_upper(stream: HboneStream, data: bytes) -> None:
        while True:
            stream.write(data.upper())
            await stream.drain()
            data = await stream.read(65536)
            if not data:
                break
        stream.write_eof()
        await stream.drain()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    trailers: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, object]:
        return dict(json.loads(self.body))


class H1Client:
    """HTTP/1.1 over one HBONE tunnel to the waypoint, parsing responses with httptools."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream
        self._buffer = b""

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        *,
        host: str = HOST,
    ) -> Response:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.stream.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self.stream.drain()
        return await self.response(head=method == "HEAD")

    async def response(self, *, head: bool = False) -> Response:
        proto = _ResponseCollector()
        parser = httptools.HttpResponseParser(proto)
        while not proto.done:
            data = self._buffer or await asyncio.wait_for(self.stream.read(1 << 20), TIMEOUT)
            self._buffer = b""
            if not data:
                raise ConnectionError("waypoint closed the connection")
            parser.feed_data(data)
            if head and proto.head_done:
                break
        return Response(
            parser.get_status_code(),
            proto.headers,
            b"".join(proto.body),
            proto.trailers,
        )


class _ResponseCollector:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.head_done = False
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        target = self.trailers if self.head_done else self.headers
        target[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


def _listen(address: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class Rig:
    """`async with Rig() as rig`: waypoint + two pods + a client connection."""

    def __init__(self, resources: dict[str, mesh_pb2.Resource] | None = None) -> None:
        self.resources = resources if resources is not None else base_resources()
        ca = make_ca()
        self.ids: dict[SpiffeId, TlsIdentity] = {
            sid: make_leaf(ca, sid) for sid in (WAYPOINT_ID, CLIENT_ID, BACKEND_ID)
        }
        self.pods = {name: Pod(name, address) for name, address in PODS.items()}
        self._servers: list[asyncio.Server] = []
        self._clients: list[HboneClientConnection] = []

    async def __aenter__(self) -> Rig:
        first = _listen(PODS["reviews-v1"])
        self.hbone_port = first.getsockname()[1]
        socks = [first, _listen(PODS["reviews-v2"], self.hbone_port)]
        backend_ctx = server_context(self.ids[BACKEND_ID])
        for sock, pod in zip(socks, self.pods.values(), strict=True):
            self._servers.append(await serve(sock, backend_ctx, pod.handle))
        waypoint_ctx = client_context(self.ids[WAYPOINT_ID])

        async def own_context() -> object:
            return waypoint_ctx

        self.registry = CollectorRegistry()
        self.waypoint = Waypoint(
            "demo/waypoint",
            own_context,  # type: ignore[arg-type]
            upstream_hbone_port=self.hbone_port,
            sniff_timeout=0.5,
            headers_timeout=HEADERS_TIMEOUT,
            registry=self.registry,
        )
        self.waypoint.update_state("1", self.resources)
        sock = _listen("127.0.0.1")
        self.address = sock.getsockname()[:2]
        await self.waypoint.serve(sock, server_context(self.ids[WAYPOINT_ID]))
        return self

    def configure(self, *extra: mesh_pb2.Resource) -> None:
        resources = dict(self.resources)
        resources.update((r.key, r) for r in extra)
        self.waypoint.update_state(str(len(resources)), resources)

    async def connection(self) -> HboneClientConnection:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        conn = await HboneClientConnection.connect(
            sock,
            client_context(self.ids[CLIENT_ID]),
            WAYPOINT_ID,
            address=self.address,
            timeout=TIMEOUT,
        )
        self._clients.append(conn)
        return conn

    async def tunnel(self, authority: str = f"{VIP}:{PORT}") -> HboneStream:
        conn = self._clients[0] if self._clients else await self.connection()
        return await conn.open_stream(authority)

    async def h1(self) -> H1Client:
        return H1Client(await self.tunnel())

    def seen(self) -> list[Seen]:
        return sorted((s for pod in self.pods.values() for s in pod.seen), key=lambda s: s.path)

    async def __aexit__(self, *exc: object) -> None:
        for conn in self._clients:
            conn.close()
        await self.waypoint.close()
        for server in self._servers:
            server.close()
