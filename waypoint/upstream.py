"""Reaching endpoint pods: HBONE tunnels to `<pod IP>:15008` (`:authority` podIP:targetPort,
the waypoint's certificate, the pod's identity expected), one pooled mTLS connection per
pod, and a small set of idle HTTP/1.1 connections per endpoint kept for reuse.

An idle connection is watched: a peer that closes it, or sends bytes nobody asked for,
takes it out of the set at once, so a request rarely meets a stale connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mesh.hbone.connection import (
    HboneClientConnection,
    HboneConnectError,
    HboneConnectionClosed,
    HboneStream,
    HboneStreamReset,
    HboneTimeout,
)
from mesh.hbone.limits import DEFAULT_LIMITS, HboneLimits
from mesh.hbone.protocol import HBONE_PORT, HboneError, HboneStreamRefused
from mesh.pool import HboneConnectionPool
from mesh.spiffe import SpiffeId
from mesh.tls import TlsError
from waypoint.flags import ResponseFlag

log = logging.getLogger(__name__)

ContextFn = Callable[[], Awaitable[ssl.SSLContext]]


@dataclass(frozen=True)
class Endpoint:
    """One pod port a request can go to."""

    address: str
    port: int
    identity: SpiffeId
    uid: str = ""

    @property
    def authority(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


def no_delay(sock: socket.socket) -> None:
    """TCP_NODELAY. asyncio sets it only on sockets made with proto=IPPROTO_TCP, not on
    the usual proto=0 ones; without it a response head and body written apart wait for
    the peer's delayed ACK (40 ms) between them."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class UpstreamError(Exception):
    """An attempt failed before a response head arrived. `condition` is the Envoy
    `retry_on` condition it satisfies; `flag` the response flag if it is the last one."""

    def __init__(self, message: str, condition: str, flag: ResponseFlag, status: int = 503):
        super().__init__(message)
        self.condition = condition
        self.flag = flag
        self.status = status


def connect_failure(exc: BaseException, endpoint: Endpoint) -> UpstreamError:
    if isinstance(exc, HboneStreamReset) and exc.refused:
        return UpstreamError(
            f"{endpoint.authority} refused the stream",
            "refused-stream",
            ResponseFlag.UPSTREAM_REMOTE_RESET,
        )
    return UpstreamError(
        f"cannot reach {endpoint.authority} ({endpoint.identity}): {exc}",
        "connect-failure",
        ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
    )


def reset_failure(exc: BaseException | None, endpoint: Endpoint) -> UpstreamError:
    refused = isinstance(exc, HboneStreamReset) and exc.refused
    return UpstreamError(
        f"{endpoint.authority} reset the request before answering: {exc or 'closed'}",
        "refused-stream" if refused else "reset",
        ResponseFlag.UPSTREAM_CONNECTION_TERMINATION,
    )


CONNECT_ERRORS = (HboneError, TlsError, OSError, ssl.SSLError)
STREAM_ERRORS = (HboneStreamReset, HboneConnectionClosed, ConnectionError)


class Tunnels:
    """HBONE tunnels to endpoints over pooled connections, one per (pod address, identity)."""

    def __init__(
        self,
        client_context: ContextFn,
        *,
        hbone_port: int = HBONE_PORT,
        limits: HboneLimits = DEFAULT_LIMITS,
    ) -> None:
        self._client_context = client_context
        self._hbone_port = hbone_port
        self._limits = limits
        self._pool: HboneConnectionPool[tuple[str, SpiffeId]] = HboneConnectionPool()

    async def open(self, endpoint: Endpoint, timeout: float = 10.0) -> HboneStream:
        """A tunnel to `endpoint`; raises UpstreamError (connect-failure) on any failure."""

        async def connect() -> HboneClientConnection:
            family = socket.AF_INET6 if ":" in endpoint.address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            no_delay(sock)
            try:
                return await HboneClientConnection.connect(
                    sock,
                    await self._client_context(),
                    endpoint.identity,
                    address=(endpoint.address, self._hbone_port),
                    timeout=timeout,
                    limits=self._limits,
                )
            except BaseException:
                sock.close()
                raise

        try:
            async with asyncio.timeout(timeout):
                return await self._pool.open_stream(
                    (endpoint.address, endpoint.identity), connect, endpoint.authority
                )
        except (TimeoutError, HboneTimeout) as exc:
            raise UpstreamError(
                f"connecting to {endpoint.authority} timed out after {timeout}s",
                "connect-failure",
                ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
            ) from exc
        except (HboneStreamRefused, HboneConnectError, *CONNECT_ERRORS) as exc:
            raise connect_failure(exc, endpoint) from exc

    def close(self) -> None:
        self._pool.close()


class IdleSet:
    """Idle reusable connections per endpoint (most recently used first), each watched
    until taken, and closed after `idle_timeout` or when the peer closes it."""

    def __init__(self, *, max_per_endpoint: int = 16, idle_timeout: float = 60.0) -> None:
        self._max = max_per_endpoint
        self._idle_timeout = idle_timeout
        self._idle: dict[Endpoint, list[tuple[HboneStream, asyncio.Task[None]]]] = {}

    def count(self, endpoint: Endpoint) -> int:
        return len(self._idle.get(endpoint, ()))

    def take(self, endpoint: Endpoint) -> HboneStream | None:
        entries = self._idle.get(endpoint)
        while entries:
            tunnel, watcher = entries.pop()
            watcher.cancel()
            if not tunnel.is_closed:
                return tunnel
        return None

    def put(self, endpoint: Endpoint, tunnel: HboneStream) -> None:
        entries = self._idle.setdefault(endpoint, [])
        if len(entries) >= self._max:
            tunnel.close()
            return
        watcher = asyncio.get_running_loop().create_task(self._watch(endpoint, tunnel))
        entries.append((tunnel, watcher))

    async def _watch(self, endpoint: Endpoint, tunnel: HboneStream) -> None:
        with contextlib.suppress(TimeoutError, *STREAM_ERRORS):
            async with asyncio.timeout(self._idle_timeout):
                await tunnel.read(1)  # EOF, or bytes nobody asked for: either way unusable
        entries = self._idle.get(endpoint, [])
        for i, (t, _) in enumerate(entries):
            if t is tunnel:
                del entries[i]
                break
        if not entries:
            self._idle.pop(endpoint, None)
        tunnel.close()

    def close(self) -> None:
        for entries in self._idle.values():
            for tunnel, watcher in entries:
                watcher.cancel()
                tunnel.close()
        self._idle.clear()
