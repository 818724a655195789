"""The three listeners ztunnel holds inside one pod's netns, and everything they spawned.

All three are bound at once when the agent hands the pod over (so a port clash fails the
add loudly); the HBONE one starts serving once the pod's certificate is there. Every
connection accepted on them, every HBONE connection dialed from the pod and the netns
handle end when the pod is released: nothing keeps serving with a released pod's state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from h2.errors import ErrorCodes

from mesh.hbone.connection import HboneServerProtocol, HboneStream, server_factory
from mesh.hbone.protocol import ConnectRequest, Status
from mesh.hbone.tcp import TcpDuplex
from mesh.netns import socket_in, write_sysctl
from mesh.spiffe import SpiffeId
from ztunnel import inbound, inbound_passthrough, outbound
from ztunnel.context import LocalPod, ProxyContext
from ztunnel.label_memo import LabelMemo
from ztunnel.sockets import HBONE_PORT, INBOUND_PORT, INBOUND_SOURCE, OUTBOUND_PORT
from ztunnel.upstream_sockets import UpstreamSockets

log = logging.getLogger(__name__)

# Returns the relay it started (see `ConnectionTable.start`), or None.
TcpHandler = Callable[
    [ProxyContext, LocalPod, TcpDuplex], Coroutine[Any, Any, asyncio.Future[Any] | None]
]

BACKLOG = 1024
CERT_ATTEMPTS = 60
CERT_RETRY_SECONDS = 2.0


class PodProxy:
    def __init__(self, ctx: ProxyContext, pod: LocalPod) -> None:
        self.ctx = ctx
        self.pod = pod
        bound: list[socket.socket] = []
        try:
            for address in (("127.0.0.1", OUTBOUND_PORT), ("0.0.0.0", INBOUND_PORT),
                            ("0.0.0.0", HBONE_PORT)):  # fmt: skip
                # No listen() yet: a reuseport listener takes its share of new connections
                # at once, so each starts listening only when it can serve.
                bound.append(socket_in(pod.netns, bind=address, reuse_port=True))
        except OSError:
            for sock in bound:
                sock.close()
            raise
        self.outbound_sock, self.inbound_sock, self.hbone_sock = bound
        # Deliveries to the app (both inbound listeners); closed with the pod.
        self.upstream = UpstreamSockets(pod.netns, INBOUND_SOURCE)
        self.labels = LabelMemo(pod)  # both directions' connection labels
        self._servers: list[asyncio.Server] = []
        self._hbone_task: asyncio.Task[None] | None = None
        # Handler tasks, then the relays they started: what `close` ends.
        self._handlers: set[asyncio.Future[Any]] = set()
        self._tunnels: weakref.WeakSet[HboneServerProtocol] = weakref.WeakSet()
        self.serving = False
        self.draining = False
        self.closed = False

    @property
    def inbound_fd(self) -> int:
        return self.inbound_sock.fileno()

    async def start(self) -> None:
        # When an older ztunnel closes its listeners, the kernel hands connections still in
        # their accept queues to ours instead of resetting them.
        write_sysctl(self.pod.netns, "net.ipv4.tcp_migrate_req", "1")
        loop = asyncio.get_running_loop()
        for handler, sock in (
            (functools.partial(outbound.handle, memo=self.labels), self.outbound_sock),
            (
                functools.partial(inbound_passthrough.handle, sockets=self.upstream),
                self.inbound_sock,
            ),
        ):
            # create_server listen()s again: pass our backlog, or it falls back to 100.
            server = await loop.create_server(self._tracked(handler), sock=sock, backlog=BACKLOG)
            self._servers.append(server)
        self._hbone_task = asyncio.create_task(self._serve_hbone())

    def _tracked(self, handler: TcpHandler) -> Callable[[], TcpDuplex]:
        """A protocol factory running ``handler`` per connection as a task, then tracking
        the relay it started, so that this pod can close both when it is released."""

        def start(client: TcpDuplex) -> None:
            if self.closed:
                client.abort()
                return
            task = asyncio.get_running_loop().create_task(handler(self.ctx, self.pod, client))
            self._handlers.add(task)
            task.add_done_callback(self._handled)

        return lambda: TcpDuplex(on_connect=start)

    def _handled(self, task: asyncio.Task[asyncio.Future[Any] | None]) -> None:
        """A handler ended: track the relay it started until it ends (no task kept)."""
        self._handlers.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("pod %s: connection handler failed", self.pod.ref, exc_info=exc)
            return
        relaying = task.result()
        if relaying is None or relaying.done():
            return
        if self.closed:  # released while the handler was finishing
            relaying.cancel()
            return
        self._handlers.add(relaying)
        relaying.add_done_callback(self._handlers.discard)

    def _hbone_protocol(self, context: ssl.SSLContext) -> HboneServerProtocol:
        protocol = server_factory(self._inbound, tls=context)()
        self._tunnels.add(protocol)
        return protocol

    def _inbound(
        self, stream: HboneStream, request: ConnectRequest, peer: SpiffeId
    ) -> asyncio.Future[None]:
        """The stream's handler: what the HBONE server awaits (see `inbound.handle`)."""
        # A handshake that was under way when the pod was released ends here.
        if self.closed:
            stream.refuse(Status.UPSTREAM_UNREACHABLE)
            return _done()
        # Draining: "not processed, retry elsewhere" (RFC 9113 8.7); the peer's pool dials
        # again and reaches the ztunnel that now holds the listener.
        if self.draining:
            stream.reset(ErrorCodes.REFUSED_STREAM)
            return _done()
        # Our root may sign for other trust domains (federation); they are not our mesh.
        if peer.trust_domain != self.ctx.trust_domain:
            log.warning(
                "inbound HBONE to %s refused: peer %s is not in trust domain %s",
                self.pod.ref,
                peer,
                self.ctx.trust_domain,
            )
            stream.refuse(Status.UNAUTHENTICATED)
            return _done()
        return inbound.handle(self.ctx, self.pod, stream, request, peer, self.upstream, self.labels)

    async def _serve_hbone(self) -> None:
        for attempt in range(1, CERT_ATTEMPTS + 1):
            try:
                context = await self.ctx.certs.server_context(self.pod.identity)
                break
            except Exception as exc:  # the one catch-all of this loop: retry, then give up loudly
                log.warning(
                    "pod %s: no certificate for %s yet (attempt %d/%d): %s",
                    self.pod.ref,
                    self.pod.identity,
                    attempt,
                    CERT_ATTEMPTS,
                    exc,
                )
                await asyncio.sleep(CERT_RETRY_SECONDS)
        else:
            log.error("pod %s: giving up on a certificate; inbound mTLS stays closed", self.pod.ref)
            return
        self._servers.append(
            await asyncio.get_running_loop().create_server(
                lambda: self._hbone_protocol(context), sock=self.hbone_sock, backlog=BACKLOG
            )
        )
        self.serving = True
        log.info("pod %s: HBONE on :%d as %s", self.pod.ref, HBONE_PORT, self.pod.identity)

    @property
    def live_connections(self) -> int:
        """Proxied connections still open: accepted plain ones and tunnelled streams."""
        return len(self._handlers) + sum(p.active_streams for p in list(self._tunnels))

    def drain(self) -> None:
        """Stop accepting (a newer ztunnel listens beside us); let established connections
        finish. HBONE connections take no new streams and close once idle."""
        self.draining = True
        self._stop_listening()
        self.close_idle_tunnels()

    def _stop_listening(self) -> None:
        if self._hbone_task is not None:
            self._hbone_task.cancel()
        for server in self._servers:
            server.close()
        for sock in (self.outbound_sock, self.inbound_sock, self.hbone_sock):
            sock.close()

    def close_idle_tunnels(self) -> None:
        for protocol in list(self._tunnels):
            if protocol.active_streams == 0:
                protocol.close()

    async def close(self) -> None:
        """Stop listening, end every connection of the pod (both directions), drop its netns."""
        self.closed = True
        self.serving = False
        self._stop_listening()
        for protocol in list(self._tunnels):
            protocol.close()
        for close in list(self.pod.fast_inbound):
            close()
        self.pod.pool.close()
        self.upstream.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        self.pod.netns.close()


def _done() -> asyncio.Future[None]:
    """The handler of a stream already answered: nothing left to await."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done
