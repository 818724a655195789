"""The waypoint's data path as one object, independent of where configuration and
certificates come from: `main` feeds it from the controller, tests feed it directly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from mesh.api import mesh_pb2
from mesh.hbone.connection import serve
from mesh.hbone.limits import DEFAULT_LIMITS, HboneLimits
from mesh.hbone.protocol import HBONE_PORT
from waypoint.downstream_h1 import HEADERS_TIMEOUT
from waypoint.forward import Forwarder
from waypoint.inbound import SNIFF_TIMEOUT, Inbound
from waypoint.observe import Exporter, Observer
from waypoint.proxy import Proxy
from waypoint.state import WaypointState
from waypoint.telemetry import RequestMetrics
from waypoint.upstream import ContextFn, IdleSet, Tunnels, no_delay

log = logging.getLogger(__name__)

DRAIN_POLL_SECONDS = 0.2


class Waypoint:
    def __init__(
        self,
        ref: str,
        client_context: ContextFn,
        *,
        upstream_hbone_port: int = HBONE_PORT,
        limits: HboneLimits = DEFAULT_LIMITS,
        rng: random.Random | None = None,
        sniff_timeout: float = SNIFF_TIMEOUT,
        headers_timeout: float = HEADERS_TIMEOUT,
        registry: CollectorRegistry | None = None,
        exporter: Exporter | None = None,
    ) -> None:
        """`ref` is "<namespace>/<name>" of the Gateway; `client_context` gives the
        waypoint's own identity for upstream mTLS."""
        self.ref = ref
        self.state = WaypointState()
        self.synced = False
        self._limits = limits
        rng = rng or random.Random()
        tunnels = Tunnels(client_context, hbone_port=upstream_hbone_port, limits=limits)
        self.forwarder = Forwarder(tunnels, IdleSet(), rng)
        observer = Observer(RequestMetrics(registry) if registry is not None else None, exporter)
        self.proxy = Proxy(ref, lambda: self.state, self.forwarder, observer, rng)
        self.inbound = Inbound(
            ref,
            lambda: self.state,
            self.proxy,
            sniff_timeout=sniff_timeout,
            headers_timeout=headers_timeout,
        )
        self._servers: list[asyncio.Server] = []

    def update_state(self, version: str, resources: Mapping[str, mesh_pb2.Resource]) -> None:
        self.state = WaypointState.build(version, resources)
        self.synced = True
        log.info("configuration %s: %d services", version, len(self.state.services_by_host))

    async def serve(self, sock: socket.socket, server_context: ssl.SSLContext) -> asyncio.Server:
        """HBONE on a listening socket with the waypoint's identity (accepted sockets
        inherit its TCP_NODELAY)."""
        no_delay(sock)
        sock.setblocking(False)
        server = await serve(sock, server_context, self.inbound.handle, limits=self._limits)
        self._servers.append(server)
        return server

    async def drain(self, deadline_seconds: float, stop_early: asyncio.Event) -> None:
        """Stop taking tunnels (new ones are refused unprocessed, so callers retry on
        another instance), close keep-alive HTTP/1.1 after the response in flight, and wait
        for the tunnels being served until the deadline or ``stop_early``."""
        self.inbound.draining = True
        for server in self._servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_seconds
        while self.inbound.live and not stop_early.is_set() and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_early.wait(), DRAIN_POLL_SECONDS)
        if self.inbound.live:
            log.warning("drain ended with %d tunnels open; closing them", self.inbound.live)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        await self.forwarder.close()
