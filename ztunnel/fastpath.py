"""Same-node fast path: a connection between two enrolled pods of this node skips TLS,
HBONE and, once ztunnel has decided, user space.

The decision is the HBONE path's, made with the same functions: ``decide_outbound`` must
pick HBONE straight to a pod this ztunnel serves (never a waypoint, never a Service or
workload a waypoint takes), and the destination's L4 authorization (``authz.authorize``,
with the source pod's identity and address, as the destination ztunnel would see them
over HBONE) must allow it. PeerAuthentication STRICT is satisfied as on the HBONE path:
both identities are the ones the agent handed over, no plaintext peer is involved.

Then ztunnel connects to the app inside the destination pod from 127.0.0.7 (HBONE
deliveries come from 127.0.0.6), so sockops tracks the app's end, and pairs the two app
sockets in the agent's maps: fastpath.c redirects each app socket's sends straight into
the other app's receive queue, or, while that one has unread bytes from the TCP connection
or too many queued, into the egress of ztunnel's socket towards it. ztunnel keeps relaying
what the apps sent before the pairing (and tells the kernel how much it relayed, so
nothing overtakes it), and it keeps both connections: FIN and close still travel through
them, so half-close, close, the live policy re-check (it unpairs, then closes both) and
metrics work as on every other path. Without the maps (agent not there yet, old kernel) the same
decision is relayed in user space.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace

from mesh.hbone.relay import Duplex, Push
from mesh.hbone.tcp import TcpDuplex
from ztunnel import authz
from ztunnel.connections import Bypass, ConnectionInfo
from ztunnel.context import LocalPod, ProxyContext, workload_labels
from ztunnel.fastpath_maps import FastpathKey, FastPathMaps
from ztunnel.route import OutboundDecision, Protocol
from ztunnel.sockets import PROXY_PORTS, open_upstream

log = logging.getLogger("ztunnel.access")

FASTPATH_SOURCE = "127.0.0.7"  # AMBIMESH_FASTPATH_SOURCE in bpf/src/maps.h
# connection_security_policy of fast-path connections: not mTLS, not plaintext between
# strangers either (both identities are known to the node); dashboards can tell it apart.
SAME_NODE = "same_node"


def local_target(ctx: ProxyContext, decision: OutboundDecision) -> LocalPod | None:
    """The pod of this node an outbound decision would tunnel to directly, if the fast path
    may take it: HBONE to the workload itself (a waypoint is never skipped)."""
    if ctx.fast_path is None or decision.protocol is not Protocol.HBONE:
        return None
    if decision.waypoint is not None or decision.destination is None:
        return None
    return ctx.local_pods.get(decision.destination.uid)


async def handle(
    ctx: ProxyContext,
    pod: LocalPod,
    target: LocalPod,
    client: TcpDuplex,
    decision: OutboundDecision,
    original: str,
) -> None:
    assert ctx.fast_path is not None
    state = ctx.state
    host, _, port_text = decision.authority.rpartition(":")
    port = int(port_text)
    if host not in target.info.addresses or port in PROXY_PORTS:
        log.warning(
            "same-node %s -> %s refused: not an app port of %s", pod.ref, original, target.ref
        )
        client.close()
        return
    source = pod.workload(state)
    workload = target.workload(state)
    source_ip = pod.info.addresses[0] if pod.info.addresses else "127.0.0.1"
    _, client_port = client.get_extra_info("peername")[:2]
    # Both reports are this ztunnel's: the source's, and the destination's that the
    # destination ztunnel would make for an HBONE connection.
    labels = replace(
        workload_labels(
            "destination",
            source,
            pod.identity,
            workload,
            target.identity,
            state.service_for(workload, port),
            False,
        ),
        connection_security_policy=SAME_NODE,
    )
    source_labels = workload_labels(
        "source",
        source,
        pod.identity,
        decision.destination,
        decision.expected_identity,
        decision.service,
        False,
    )
    info = ConnectionInfo(
        direction="outbound",
        source=f"{source_ip}:{client_port}",
        destination=original,
        labels=replace(source_labels, connection_security_policy=SAME_NODE),
        via=SAME_NODE,
    )
    conn = authz.Connection(source_ip, pod.identity, host, port)
    verdict = authz.authorize(state, workload, conn)
    if not verdict.allowed:
        ctx.connections.deny(replace(info, direction="inbound", labels=labels), verdict)
        client.close()
        return
    try:
        app = await open_upstream(target.netns, (host, port), FASTPATH_SOURCE)
    except OSError as exc:
        log.warning("same-node %s -> %s: app unreachable: %s", pod.ref, original, exc)
        client.close()
        return
    maps = ctx.fast_path.maps()
    pairing = _Pairing.start(maps, client, app) if maps is not None else None
    authorized = authz.Authorized(workload.uid, conn, verdict.audit)
    downstream: Duplex = client
    upstream: Duplex = app
    bypass = Bypass(labels, lambda: (0, 0))
    if pairing is not None:
        downstream = _Relayed(client, pairing.relayed_to_client, pairing.unpair)
        upstream = _Relayed(app, pairing.relayed_to_app, pairing.unpair)
        bypass = Bypass(labels, pairing.finish)

    def close() -> None:  # the destination pod is released
        downstream.close()
        upstream.close()

    target.fast_inbound.add(close)
    try:
        await ctx.connections.relay(info, downstream, upstream, authorized, bypass)
    finally:
        target.fast_inbound.discard(close)


class _Pairing:
    """One connection's entries in the maps: C (the client app's socket), S (the server
    app's), and ztunnel's two sockets, Z1 (accepted from C) and Z2 (connected to S)."""

    def __init__(self, maps: FastPathMaps, z1: FastpathKey, z2: FastpathKey) -> None:
        self.maps = maps
        self.z1, self.z2 = z1, z2
        self.c, self.s = z1.reversed(), z2.reversed()

    @classmethod
    def start(cls, maps: FastPathMaps, client: TcpDuplex, app: TcpDuplex) -> _Pairing | None:
        """None if the kernel cannot take this connection: C was not tracked (the switch
        was off when it connected), or a socket is no longer ESTABLISHED (the sockhash
        refuses it: the client already closed)."""
        try:
            z1 = maps.join(client.get_extra_info("socket"))
            if not maps.tracked(z1.reversed()):
                return None
            pairing = cls(maps, z1, maps.join(app.get_extra_info("socket")))
        except OSError as exc:
            log.debug("same-node connection relayed in user space: %s", exc)
            return None
        try:
            maps.pair(pairing.c, pairing.z2, 0)
            maps.pair(pairing.s, pairing.z1, 0)
        except OSError as exc:
            pairing.unpair()  # a half-made pair would redirect what the relay does not count
            log.debug("same-node connection relayed in user space: %s", exc)
            return None
        for side in (client, app):
            # Paused as soon as anything waits in user space, resumed once it reached the
            # kernel: the moment to tell fastpath.c how much was relayed.
            side.transport.set_write_buffer_limits(high=0)
        return pairing

    def relayed_to_app(self, count: int) -> None:
        self._update(self.c, self.z2, count)

    def relayed_to_client(self, count: int) -> None:
        self._update(self.s, self.z1, count)

    def _update(self, app: FastpathKey, target: FastpathKey, count: int) -> None:
        try:
            self.maps.pair(app, target, count)
        except OSError as exc:  # the socket stays on the relay, which is always correct
            log.debug("same-node pairing not updated: %s", exc)

    def unpair(self) -> None:
        for app in (self.c, self.s):
            with contextlib.suppress(OSError):
                self.maps.unpair(app)

    def finish(self) -> tuple[int, int]:
        """(request, response) bytes the kernel carried; forgets the entries."""
        try:
            return self.maps.redirected(self.c), self.maps.redirected(self.s)
        except OSError as exc:
            log.warning("same-node byte counts lost: %s", exc)
            return 0, 0
        finally:
            for app in (self.c, self.s):
                with contextlib.suppress(OSError):
                    self.maps.forget(app)


class _Relayed:
    """A `TcpDuplex` whose writes (bytes relayed from the other app) are reported once they
    reached the kernel; closing it first unpairs, so the kernel stops redirecting before
    the connections end (a policy re-check revokes at once)."""

    def __init__(
        self, inner: TcpDuplex, relayed: Callable[[int], None], unpair: Callable[[], None]
    ) -> None:
        self._inner = inner
        self._relayed = relayed
        self._unpair = unpair
        self._written = 0
        self._waiting = False

    async def read(self, max_bytes: int) -> bytes:
        return await self._inner.read(max_bytes)

    def write(self, data: bytes) -> None:
        self._inner.write(data)
        self._written += len(data)
        if not self._inner.write_blocked:  # nothing left in user space (high water 0)
            self._relayed(self._written)
        elif not self._waiting:
            self._waiting = True
            self._inner.when_unblocked(self._flushed)

    def _flushed(self) -> None:
        if not self._waiting or self._inner.write_blocked:
            return
        self._waiting = False
        self._relayed(self._written)

    async def drain(self) -> None:
        await self._inner.drain()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def close(self) -> None:
        self._unpair()
        self._inner.close()

    def start_push(self, push: Push) -> None:
        self._inner.start_push(push)

    def stop_push(self) -> None:
        self._inner.stop_push()

    @property
    def write_blocked(self) -> bool:
        return self._inner.write_blocked

    def when_unblocked(self, callback: Callable[[], None]) -> None:
        self._inner.when_unblocked(callback)

    def eof_sent(self) -> bool:
        return self._inner.eof_sent()
