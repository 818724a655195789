"""Inbound HBONE (15008 in the pod's netns): verify the tunnel targets this pod and that
L4 authorization allows it, then deliver it to the app from 127.0.0.6 so the BPF capture
lets the delivery through."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

from mesh.hbone.connection import HboneStream
from mesh.hbone.protocol import ConnectRequest, Status
from mesh.spiffe import SpiffeId
from ztunnel import authz
from ztunnel.connections import ConnectionInfo
from ztunnel.context import LocalPod, ProxyContext
from ztunnel.label_memo import LabelMemo
from ztunnel.sockets import PROXY_PORTS, connect_upstream
from ztunnel.upstream_sockets import UpstreamSockets

log = logging.getLogger("ztunnel.access")
# The callbacks read no context variable: no copy of the context per tunnel.
_EMPTY_CONTEXT = contextvars.Context()


def handle(
    ctx: ProxyContext,
    pod: LocalPod,
    stream: HboneStream,
    request: ConnectRequest,
    peer: SpiffeId,
    sockets: UpstreamSockets,
    memo: LabelMemo,
) -> asyncio.Future[None]:
    """The tunnel's end, for the HBONE server to await as the stream's handler: done
    once the tunnel was refused, or relayed and closed; cancelling it (the peer reset an
    unanswered stream) stops the admission or closes the relay. ``sockets``: the pod's,
    made in its netns and bound to the delivery source; ``memo``: the pod's, for the
    tunnel's labels.

    Admission runs in a task that ends once the relay started: an open tunnel keeps a
    future and a `_Link`, not a task and coroutine frames (~1 KiB per connection)."""
    end: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    admission = asyncio.ensure_future(_admit(ctx, pod, stream, request, peer, sockets, memo))
    link = _Link(end, admission)
    end.add_done_callback(link, context=_EMPTY_CONTEXT)
    admission.add_done_callback(link, context=_EMPTY_CONTEXT)
    return end


class _Link:
    """Ties a tunnel's ``end`` to what runs for it: the admission task, then the relay.
    The done callback of all three (one object per tunnel, no partial per callback)."""

    __slots__ = ("end", "relaying", "running")

    def __init__(self, end: asyncio.Future[None], admission: asyncio.Future[Any]) -> None:
        self.end = end
        self.running: asyncio.Future[Any] = admission
        self.relaying = False

    def __call__(self, done: asyncio.Future[Any]) -> None:
        end = self.end
        if done is end:  # cancelled by the server, or finished: stop what still runs
            self.running.cancel()
        elif not self.relaying:
            self._admitted(done)
        elif not end.done():  # the relay ended
            end.set_result(None)

    def _admitted(self, admission: asyncio.Future[Any]) -> None:
        end = self.end
        if admission.cancelled():
            end.cancel()
            return
        exc = admission.exception()
        relaying = admission.result() if exc is None else None
        if end.done():  # cancelled while the relay was being started
            if relaying is not None:
                relaying.cancel()
            return
        if exc is not None:
            end.set_exception(exc)
        elif relaying is None:
            end.set_result(None)
        else:
            self.running = relaying
            self.relaying = True
            relaying.add_done_callback(self, context=_EMPTY_CONTEXT)


async def _admit(
    ctx: ProxyContext,
    pod: LocalPod,
    stream: HboneStream,
    request: ConnectRequest,
    peer: SpiffeId,
    sockets: UpstreamSockets,
    memo: LabelMemo,
) -> asyncio.Future[Any] | None:
    """The tunnel's relay to the app, started, or None if it was refused."""
    target = (request.authority_host, request.authority_port)
    if request.authority_host not in pod.info.addresses or request.authority_port in PROXY_PORTS:
        log.warning(
            "inbound HBONE from %s for %s:%d refused: not an app port of pod %s",
            peer,
            *target,
            pod.ref,
        )
        stream.refuse(Status.BAD_REQUEST)
        return None
    state = ctx.state
    peer_address = stream.peer_address  # made anew on each read
    peering = memo.inbound(state, peer_address or "", peer, request.authority_port)
    workload = peering.workload
    info = ConnectionInfo(
        direction="inbound",
        source=peer_address or "unknown",
        destination=request.authority,
        labels=peering.labels,
        via="hbone",
        hbone=request.authority,
    )
    conn = authz.Connection(peer_address or "", peer, *target)
    decision = memo.authorize(state, workload, conn)
    if not decision.allowed:
        ctx.connections.deny(info, decision)
        stream.refuse(Status.UNAUTHENTICATED)  # Istio's ztunnel answers a denial with 401
        return None
    try:
        app = await connect_upstream(sockets.take(), target)
    except OSError as exc:
        log.warning("inbound HBONE from %s: app at %s:%d unreachable: %s", peer, *target, exc)
        stream.refuse(Status.UPSTREAM_UNREACHABLE)
        return None
    await stream.accept()
    authorized = authz.Authorized(workload.uid, conn, decision.audit)
    return ctx.connections.start(info, stream, app, authorized)
