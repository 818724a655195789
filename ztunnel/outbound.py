"""Outbound: connections the pod made, captured on 127.0.0.1:15001 inside its netns, sent
on as HBONE (mesh destinations) or plain TCP (everything else)."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from mesh.hbone.connection import HboneClientConnection, HboneStream
from mesh.hbone.protocol import HboneError
from mesh.hbone.tcp import TcpDuplex
from mesh.tls import TlsError
from ztunnel import fastpath
from ztunnel.connections import ConnectionInfo
from ztunnel.context import LocalPod, ProxyContext
from ztunnel.label_memo import LabelMemo
from ztunnel.route import NoHealthyEndpoint, Protocol, decide_outbound
from ztunnel.sockets import open_upstream, original_destination, upstream_socket

log = logging.getLogger("ztunnel.access")


async def handle(
    ctx: ProxyContext, pod: LocalPod, client: TcpDuplex, *, memo: LabelMemo
) -> asyncio.Future[Any] | None:
    """Open the connection's upstream and start relaying: the relay's future (see
    `ConnectionTable.start`), or None if it was refused, failed or took the fast path.
    ``memo``: the pod's, for the connection's labels."""
    try:
        dst_ip, dst_port = original_destination(client.get_extra_info("socket"))
    except OSError as exc:
        log.warning(
            "outbound from %s: no original destination (%s); is the BPF getsockopt "
            "program attached to ztunnel's cgroup?",
            pod.ref,
            exc,
        )
        client.close()
        return None
    state = ctx.state
    try:
        decision = decide_outbound(state, dst_ip, dst_port, pick=random.choice)
    except NoHealthyEndpoint as exc:
        log.warning("outbound %s -> %s:%d refused: %s", pod.ref, dst_ip, dst_port, exc)
        client.close()
        return None
    target = fastpath.local_target(ctx, decision)
    if target is not None:
        await fastpath.handle(ctx, pod, target, client, decision, f"{dst_ip}:{dst_port}")
        return None
    mtls = decision.protocol is Protocol.HBONE
    labels = memo.outbound(state, decision)
    upstream: HboneStream | TcpDuplex
    try:
        if mtls:
            assert decision.expected_identity is not None
            key = (decision.expected_identity, decision.address[0])

            async def dial() -> HboneClientConnection:
                context = await ctx.certs.client_context(pod.identity)
                return await HboneClientConnection.connect(
                    upstream_socket(pod.netns),
                    context,
                    decision.expected_identity,
                    address=decision.address,
                )

            upstream = await pod.pool.open_stream(key, dial, decision.authority)
        else:
            upstream = await open_upstream(pod.netns, decision.address)
    except (HboneError, TlsError, OSError) as exc:
        log.warning(
            "outbound %s -> %s:%d (%s) failed: %s",
            pod.ref,
            dst_ip,
            dst_port,
            decision.protocol.value,
            exc,
        )
        client.close()
        return None
    _, client_port = client.get_extra_info("peername")[:2]
    source_ip = pod.info.addresses[0] if pod.info.addresses else "127.0.0.1"
    info = ConnectionInfo(
        direction="outbound",
        source=f"{source_ip}:{client_port}",
        destination=f"{dst_ip}:{dst_port}",
        labels=labels,
        via=decision.protocol.value,
        hbone=decision.authority if mtls else "-",
    )
    return ctx.connections.start(info, client, upstream)
