"""Outbound: connections the pod made, captured on 127.0.0.1:15001 inside its netns, sent
on as HBONE (mesh destinations) or plain TCP (everything else)."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from mesh.hbone.connection import HboneClientConnection, HboneStream, connect_socket
from mesh.hbone.protocol import HboneError
from mesh.hbone.relay import StreamDuplex, relay
from mesh.tls import TlsError
from ztunnel.context import LocalPod, ProxyContext, workload_labels
from ztunnel.route import NoHealthyEndpoint, Protocol, decide_outbound
from ztunnel.sockets import original_destination, upstream_socket

log = logging.getLogger("ztunnel.access")


async def handle(
    ctx: ProxyContext, pod: LocalPod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    started = time.monotonic()
    client = StreamDuplex(reader, writer)
    try:
        dst_ip, dst_port = original_destination(writer.get_extra_info("socket"))
    except OSError as exc:
        log.warning(
            "outbound from %s: no original destination (%s); is the BPF getsockopt "
            "program attached to ztunnel's cgroup?",
            pod.ref,
            exc,
        )
        client.close()
        return
    state = ctx.state
    source = pod.workload(state)
    try:
        decision = decide_outbound(state, dst_ip, dst_port, pick=random.choice)
    except NoHealthyEndpoint as exc:
        log.warning("outbound %s -> %s:%d refused: %s", pod.ref, dst_ip, dst_port, exc)
        client.close()
        return
    mtls = decision.protocol is Protocol.HBONE
    labels = workload_labels(
        "source",
        source,
        pod.identity,
        decision.destination,
        decision.expected_identity,
        decision.service,
        mtls,
    )
    upstream: HboneStream | StreamDuplex
    try:
        if mtls:
            assert decision.expected_identity is not None
            key = (pod.identity, decision.expected_identity, decision.address[0])

            async def dial() -> HboneClientConnection:
                context = await ctx.certs.client_context(pod.identity)
                return await HboneClientConnection.connect(
                    upstream_socket(pod.netns_fd),
                    context,
                    decision.expected_identity,
                    address=decision.address,
                )

            upstream = await ctx.pool.open_stream(key, dial, decision.authority)
        else:
            sock = upstream_socket(pod.netns_fd)
            await connect_socket(sock, decision.address)
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
            upstream = StreamDuplex(up_reader, up_writer)
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
        return
    ctx.metrics.open(labels)
    sent = received = 0
    try:
        sent, received = await relay(client, upstream)
    finally:
        ctx.metrics.close(labels, sent, received)
        log.info(
            "outbound complete src.workload=%s src.identity=%s dst.addr=%s:%d via=%s "
            "dst.hbone=%s dst.identity=%s dst.service=%s sent=%d recv=%d duration=%.0fms",
            pod.ref,
            pod.identity,
            dst_ip,
            dst_port,
            decision.protocol.value,
            decision.authority,
            decision.expected_identity or "-",
            labels.destination_service,
            sent,
            received,
            (time.monotonic() - started) * 1000,
        )
