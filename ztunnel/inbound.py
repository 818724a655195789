"""Inbound HBONE (15008 in the pod's netns): verify the tunnel targets this pod and that
L4 authorization allows it, then deliver it to the app from 127.0.0.6 so the BPF capture
lets the delivery through."""

from __future__ import annotations

import logging
from collections.abc import Coroutine
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


async def handle(
    ctx: ProxyContext,
    pod: LocalPod,
    stream: HboneStream,
    request: ConnectRequest,
    peer: SpiffeId,
    sockets: UpstreamSockets,
    memo: LabelMemo,
) -> None:
    """``sockets``: the pod's, made in its netns and bound to the delivery source;
    ``memo``: the pod's, for the tunnel's labels."""
    # The relay runs once _admit returned, so its locals are not kept for the connection's
    # life (see outbound.handle).
    relay = await _admit(ctx, pod, stream, request, peer, sockets, memo)
    if relay is not None:
        await relay


async def _admit(
    ctx: ProxyContext,
    pod: LocalPod,
    stream: HboneStream,
    request: ConnectRequest,
    peer: SpiffeId,
    sockets: UpstreamSockets,
    memo: LabelMemo,
) -> Coroutine[Any, Any, None] | None:
    """The tunnel's relay to the app, not started, or None if it was refused."""
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
    peering = memo.inbound(state, stream.peer_address or "", peer, request.authority_port)
    workload = peering.workload
    info = ConnectionInfo(
        direction="inbound",
        source=stream.peer_address or "unknown",
        destination=request.authority,
        labels=peering.labels,
        via="hbone",
        hbone=request.authority,
    )
    conn = authz.Connection(stream.peer_address or "", peer, *target)
    decision = authz.authorize(state, workload, conn)
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
    return ctx.connections.relay(info, stream, app, authorized)
