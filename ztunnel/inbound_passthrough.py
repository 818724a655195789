"""Inbound plaintext (15006 in the pod's netns): connections the sk_lookup program
steered here. STRICT pods refuse them; PERMISSIVE pods get them delivered unchanged
unless L4 authorization denies them (evaluated without a peer identity)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mesh.api import mesh_pb2
from mesh.hbone.tcp import TcpDuplex
from ztunnel import authz
from ztunnel.connections import ConnectionInfo
from ztunnel.context import LocalPod, ProxyContext, workload_labels
from ztunnel.sockets import PROXY_PORTS, connect_upstream
from ztunnel.upstream_sockets import UpstreamSockets

log = logging.getLogger("ztunnel.access")


async def handle(
    ctx: ProxyContext, pod: LocalPod, client: TcpDuplex, *, sockets: UpstreamSockets
) -> asyncio.Future[Any] | None:
    """Deliver to the app and start relaying: the relay's future (see
    `ConnectionTable.start`), or None if refused or failed. ``sockets``: the pod's, made
    in its netns and bound to the delivery source."""
    dst_ip, dst_port = client.get_extra_info("sockname")[:2]
    src_ip, src_port = client.get_extra_info("peername")[:2]
    state = ctx.state
    workload = pod.workload(state)
    if dst_port in PROXY_PORTS:
        log.warning(
            "inbound plaintext %s:%d -> %s:%d refused: that is ztunnel's own port",
            src_ip,
            src_port,
            dst_ip,
            dst_port,
        )
        client.close()
        return None
    if state.mtls_mode(workload, dst_port) == mesh_pb2.STRICT:
        log.warning(
            "inbound plaintext %s:%d -> %s:%d refused: pod %s requires mTLS "
            "(PeerAuthentication STRICT)",
            src_ip,
            src_port,
            dst_ip,
            dst_port,
            pod.ref,
        )
        client.close()
        return None
    source = state.by_address.get(src_ip)
    service = state.service_for(workload, dst_port)
    labels = workload_labels("destination", source, None, workload, None, service, False)
    info = ConnectionInfo(
        direction="inbound_plaintext",
        source=f"{src_ip}:{src_port}",
        destination=f"{dst_ip}:{dst_port}",
        labels=labels,
        via="tcp",
    )
    # No mTLS, no identity: principal and namespace rules cannot match it.
    conn = authz.Connection(src_ip, None, dst_ip, dst_port)
    decision = authz.authorize(state, workload, conn)
    if not decision.allowed:
        ctx.connections.deny(info, decision)
        client.close()
        return None
    try:
        app = await connect_upstream(sockets.take(), (dst_ip, dst_port))
    except OSError as exc:
        log.warning("inbound plaintext to %s:%d: app unreachable: %s", dst_ip, dst_port, exc)
        client.close()
        return None
    authorized = authz.Authorized(workload.uid, conn, decision.audit)
    return ctx.connections.start(info, client, app, authorized)
