"""The three listeners ztunnel holds inside one pod's netns.

All three are bound at once when the agent hands the pod over (so a port clash fails the
add loudly); the HBONE one starts serving once the pod's certificate is there.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from functools import partial

from mesh.hbone.connection import serve
from mesh.netns import socket_in
from ztunnel import inbound, inbound_passthrough, outbound
from ztunnel.context import LocalPod, ProxyContext
from ztunnel.sockets import HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT

log = logging.getLogger(__name__)

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
                bound.append(socket_in(pod.netns_fd, bind=address, listen=BACKLOG))
        except OSError:
            for sock in bound:
                sock.close()
            raise
        self.outbound_sock, self.inbound_sock, self.hbone_sock = bound
        self._servers: list[asyncio.Server] = []
        self._hbone_task: asyncio.Task[None] | None = None
        self.serving = False

    @property
    def inbound_fd(self) -> int:
        return self.inbound_sock.fileno()

    async def start(self) -> None:
        ctx, pod = self.ctx, self.pod
        self._servers.append(
            await asyncio.start_server(partial(outbound.handle, ctx, pod), sock=self.outbound_sock)
        )
        self._servers.append(
            await asyncio.start_server(
                partial(inbound_passthrough.handle, ctx, pod), sock=self.inbound_sock
            )
        )
        self._hbone_task = asyncio.create_task(self._serve_hbone())

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
            await serve(self.hbone_sock, context, partial(inbound.handle, self.ctx, self.pod))
        )
        self.serving = True
        log.info("pod %s: HBONE on :%d as %s", self.pod.ref, HBONE_PORT, self.pod.identity)

    async def close(self) -> None:
        if self._hbone_task is not None:
            self._hbone_task.cancel()
        for server in self._servers:
            server.close()
        for sock in (self.outbound_sock, self.inbound_sock, self.hbone_sock):
            sock.close()
        os.close(self.pod.netns_fd)
