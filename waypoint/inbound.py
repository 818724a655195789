"""HBONE in on 15008: check the tunnel is addressed to something this waypoint serves,
then sniff what it carries and hand it to the HTTP/1.1 or HTTP/2 server, or relay it as
TCP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

from h2.errors import ErrorCodes

from mesh.api import mesh_pb2
from mesh.hbone.connection import HboneStream
from mesh.hbone.protocol import ConnectRequest, Status
from mesh.spiffe import SpiffeId
from waypoint.context import Downstream, resolve
from waypoint.downstream_h1 import HEADERS_TIMEOUT, H1Server
from waypoint.downstream_h2 import serve_h2
from waypoint.h1io import READ_SIZE, PrefixedDuplex
from waypoint.proxy import Proxy
from waypoint.sniff import Protocol, sniff
from waypoint.state import WaypointState

log = logging.getLogger(__name__)

# Client-first protocols show their first bytes at once; silence this long means a
# server-first protocol (MySQL, SMTP...), relayed as TCP.
SNIFF_TIMEOUT = 1.0
# Istio's port-name convention: these ports carry no HTTP, so nothing is sniffed.
_TCP_PORT_PREFIXES = ("tcp", "tls", "mysql", "mongo", "redis", "postgres")


class Inbound:
    def __init__(
        self,
        waypoint: str,
        state: Callable[[], WaypointState],
        proxy: Proxy,
        *,
        sniff_timeout: float = SNIFF_TIMEOUT,
        headers_timeout: float = HEADERS_TIMEOUT,
    ) -> None:
        self._waypoint = waypoint
        self._state = state
        self._proxy = proxy
        self._sniff_timeout = sniff_timeout
        self._headers_timeout = headers_timeout
        self.draining = False
        self.live = 0  # tunnels being served

    async def handle(self, stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        if self.draining:
            # Not processed: the ztunnel's pool retries on a fresh connection, which only
            # another waypoint instance accepts (RFC 9113 8.7).
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return
        self.live += 1
        try:
            await self._serve(stream, request, peer)
        finally:
            self.live -= 1

    async def _serve(self, stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        state = self._state()
        target = resolve(state, self._waypoint, request.authority_host, request.authority_port)
        if target is None:
            log.info(
                "HBONE from %s for %s refused: not served by waypoint %s",
                peer,
                request.authority,
                self._waypoint,
            )
            stream.refuse(Status.BAD_REQUEST)
            return
        await stream.accept()
        downstream = Downstream(
            peer, stream.peer_address, state.source_workload(stream.peer_address, peer), target
        )
        protocol, first = await self._sniff(stream, _tcp_port(target.service, target.port))
        client = PrefixedDuplex(stream, first)
        handler = partial(self._proxy.handle, downstream)
        if protocol is Protocol.HTTP1:
            await H1Server(
                stream,
                handler,
                first,
                headers_timeout=self._headers_timeout,
                closing=lambda: self.draining,
            ).run()
        elif protocol is Protocol.HTTP2:
            await serve_h2(stream, handler, first)
        else:
            await self._proxy.relay_tcp(downstream, client)

    async def _sniff(self, stream: HboneStream, tcp_only: bool) -> tuple[Protocol, bytes]:
        data = b""
        if tcp_only:
            return Protocol.TCP, data
        try:
            async with asyncio.timeout(self._sniff_timeout):
                while (protocol := sniff(data)) is None:
                    chunk = await stream.read(READ_SIZE)
                    if not chunk:
                        return Protocol.TCP, data
                    data += chunk
        except TimeoutError:
            return Protocol.TCP, data
        return protocol, data


def _tcp_port(service: mesh_pb2.Service | None, port: int) -> bool:
    if service is None:
        return False
    for p in service.ports:
        if p.port == port:
            return p.name.lower().startswith(_TCP_PORT_PREFIXES)
    return False
