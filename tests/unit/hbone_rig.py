"""What the HBONE tests share: real certificates, a loopback server, our client, and a raw
HTTP/2-over-TLS peer that can break every rule."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    SettingsFrame,
)

from mesh.hbone.connection import (
    Handler,
    HboneClientConnection,
    HboneServerProtocol,
    HboneStream,
    server_factory,
)
from mesh.hbone.guard import CLIENT_PREFACE
from mesh.hbone.limits import DEFAULT_LIMITS, HboneLimits
from mesh.hbone.protocol import ConnectRequest
from mesh.spiffe import SpiffeId
from mesh.tls import TlsIdentity, client_context, server_context
from tests.unit.certs import CertAuthority, make_ca, make_leaf

CLIENT_ID = SpiffeId("cluster.local", "default", "sleep")
SERVER_ID = SpiffeId("cluster.local", "default", "httpbin")
TIMEOUT = 10.0
# What a client sends first: the magic string and its SETTINGS.
PREFACE = CLIENT_PREFACE + SettingsFrame(0).serialize()


@dataclass(frozen=True)
class Pki:
    ca: CertAuthority
    client: TlsIdentity
    server: TlsIdentity


def make_pki() -> Pki:
    ca = make_ca()
    return Pki(ca, make_leaf(ca, CLIENT_ID), make_leaf(ca, SERVER_ID))


async def echo(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
    """Accept, echo every byte back, half-close after the peer did."""
    await stream.accept()
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()
    stream.write_eof()
    await stream.drain()


@dataclass
class Server:
    server: asyncio.Server
    address: tuple[str, int]
    protocols: list[HboneServerProtocol] = field(default_factory=list)


class running_server:
    """An HBONE server on 127.0.0.1 that keeps its connections' protocol objects."""

    def __init__(
        self,
        identity: TlsIdentity,
        handler: Handler,
        limits: HboneLimits = DEFAULT_LIMITS,
        *,
        sockbuf: int | None = None,
    ) -> None:
        self.identity = identity
        self.handler = handler
        self.limits = limits
        self.sockbuf = sockbuf

    async def __aenter__(self) -> Server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.sockbuf is not None:  # small kernel buffers, inherited by accepted sockets
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sockbuf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.sockbuf)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        protocols: list[HboneServerProtocol] = []
        make = server_factory(self.handler, tls=server_context(self.identity), limits=self.limits)

        def factory() -> HboneServerProtocol:
            protocols.append(make())
            return protocols[-1]

        server = await asyncio.get_running_loop().create_server(factory, sock=sock)
        self.srv = Server(server, sock.getsockname()[:2], protocols)
        return self.srv

    async def __aexit__(self, *exc: object) -> None:
        self.srv.server.close()
        for protocol in self.srv.protocols:
            protocol.close()
        await asyncio.wait_for(self.srv.server.wait_closed(), TIMEOUT)


async def dial(
    server: Server,
    identity: TlsIdentity,
    expected: SpiffeId | set[SpiffeId] | None = SERVER_ID,
    limits: HboneLimits = DEFAULT_LIMITS,
) -> HboneClientConnection:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return await HboneClientConnection.connect(
        sock,
        client_context(identity),
        expected,
        address=server.address,
        timeout=TIMEOUT,
        limits=limits,
    )


async def read_all(stream: HboneStream) -> bytes:
    chunks = []
    while data := await asyncio.wait_for(stream.read(1 << 20), TIMEOUT):
        chunks.append(data)
    return b"".join(chunks)


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    """A raw frame header, free to announce what no library would let us send."""
    return length.to_bytes(3, "big") + bytes((kind, flags)) + stream_id.to_bytes(4, "big")


class RawPeer:
    """An mTLS client that writes raw HTTP/2 bytes and reads the server's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.responses: dict[int, dict[bytes, bytes]] = {}

    @classmethod
    async def open(
        cls, server: Server, identity: TlsIdentity, *, sockbuf: int | None = None
    ) -> RawPeer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if sockbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, server.address)
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(sock=sock, ssl=client_context(identity), server_hostname=""),
            TIMEOUT,
        )
        return cls(reader, writer)

    def send(self, *parts: bytes | Frame) -> None:
        self.writer.write(b"".join(p if isinstance(p, bytes) else p.serialize() for p in parts))

    def connect(self, stream_id: int, authority: str = "10.0.0.7:80", **extra: str) -> HeadersFrame:
        headers = [(":method", "CONNECT"), (":authority", authority), *extra.items()]
        return HeadersFrame(stream_id, self.encoder.encode(headers), flags=["END_HEADERS"])

    async def next_frame(self) -> Frame | None:
        """The server's next frame; None once it closed the connection."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(9), TIMEOUT)
            frame, length = Frame.parse_frame_header(memoryview(header))
            frame.parse_body(
                memoryview(await asyncio.wait_for(self.reader.readexactly(length), TIMEOUT))
            )
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        if isinstance(frame, HeadersFrame):  # decoded in order, as HPACK requires
            self.responses[frame.stream_id] = dict(self.decoder.decode(frame.data, raw=True))
        return frame

    async def frames_until_closed(self) -> list[Frame]:
        frames = []
        async with asyncio.timeout(TIMEOUT):
            while (frame := await self.next_frame()) is not None:
                frames.append(frame)
        return frames

    async def goaway(self) -> GoAwayFrame:
        """Skip to the server's GOAWAY; it must then close the connection."""
        frames = await self.frames_until_closed()
        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        assert goaways, f"server closed without GOAWAY after {frames}"
        return goaways[-1]

    def close(self) -> None:
        self.writer.transport.abort()
