"""Upstream sockets made ahead in a pod's netns (ztunnel/upstream_sockets.py) and connected
without entering it (ztunnel/sockets.py): the netns they live in, one `setns` pair per
batch, nothing left open once the pod is gone, and connect errors on both event loops;
the relays a pod's handlers started end with the pod."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from prometheus_client import CollectorRegistry
from pyroute2 import NetNS, netns

from mesh import netns as mesh_netns
from mesh.api import node_pb2
from mesh.cert_manager import CertManager
from mesh.hbone import tcp
from mesh.netns import Netns, NetnsClosed, socket_in
from tests.integration.privileged import require_privileged
from tests.unit.certs import make_ca, make_leaf
from ztunnel.connections import ConnectionTable
from ztunnel.context import LocalPod, ProxyContext
from ztunnel.metrics import TcpMetrics
from ztunnel.pod_proxy import PodProxy
from ztunnel.sockets import INBOUND_SOURCE, connect_upstream
from ztunnel.upstream_sockets import UpstreamSockets

SIOCGSKNS = 0x894C  # ioctl: an fd on the netns a socket was made in (Linux 4.9)
DROPPED = "198.18.251.2"  # a neighbour nobody is: a SYN sent there is never answered
LOOPS: list[Callable[[], asyncio.AbstractEventLoop]] = [
    asyncio.new_event_loop,
    uvloop.new_event_loop,
]


@dataclass
class Pod:
    netns: Netns
    path: str


@pytest.fixture
def pod() -> Iterator[Pod]:
    """A namespace with lo up and a veth pair, one end routing DROPPED to a made-up MAC
    address the other end drops frames for."""
    require_privileged()
    name = f"amups{secrets.token_hex(3)}"
    netns.create(name)
    handle: Netns | None = None
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("add", ifname="drop0", kind="veth", peer="drop1")
            index = ns.link_lookup(ifname="drop0")[0]
            ns.addr("add", index=index, address="198.18.251.1", prefixlen=24)
            for ifname in ("drop0", "drop1"):
                ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")
            ns.neigh("add", dst=DROPPED, lladdr="02:00:00:00:00:99", ifindex=index, state=0x80)
        handle = Netns.open(f"/var/run/netns/{name}")
        yield Pod(handle, f"/var/run/netns/{name}")
    finally:
        if handle is not None:
            handle.close()
        netns.remove(name)


def netns_of(sock: socket.socket) -> int:
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def sockets_in_netns(inode: int) -> int:
    """How many of this process's open sockets were made in the netns with this inode."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            fd = fcntl.ioctl(int(name), SIOCGSKNS)
            count += os.fstat(fd).st_ino == inode
            os.close(fd)
    return count


def count_setns(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = mesh_netns._setns

    def counted(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(mesh_netns, "_setns", counted)
    return calls


def test_sockets_are_the_pods_bound_to_the_source_and_made_a_batch_per_setns_pair(
    pod: Pod, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = os.stat("/proc/thread-self/ns/net").st_ino
    calls = count_setns(monkeypatch)

    async def main() -> None:
        pool = UpstreamSockets(pod.netns, INBOUND_SOURCE, batch=4)
        assert pool.spare == 0  # nothing made before the first use
        taken = [pool.take() for _ in range(4)]
        assert len(calls) == 2  # one setns into the pod, one back, for all four
        assert pool.spare == 0
        await asyncio.sleep(0)  # the refill runs after this iteration's callbacks
        assert pool.spare == 4
        assert len(calls) == 4
        for sock in taken:
            assert netns_of(sock) == pod.netns.inode != home
            assert sock.getsockname() == (INBOUND_SOURCE, 0)  # the port comes at connect
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert not sock.getblocking()
            sock.close()
        pool.close()

    asyncio.run(main())
    assert os.stat("/proc/thread-self/ns/net").st_ino == home


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_socket_made_ahead_connects_from_the_pods_netns(
    pod: Pod, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    async def main() -> None:
        peers: list[tuple[str, int]] = []

        async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer.get_extra_info("peername"))
            writer.write(await reader.readexactly(5))
            writer.close()

        listener = socket_in(pod.netns, bind=("127.0.0.1", 0), listen=16)
        address = listener.getsockname()
        server = await asyncio.start_server(app, sock=listener)
        pool = UpstreamSockets(pod.netns, INBOUND_SOURCE)
        try:
            duplex = await asyncio.wait_for(connect_upstream(pool.take(), address), 10)
            duplex.write(b"hello")
            assert await asyncio.wait_for(duplex.read(5), 10) == b"hello"
            duplex.close()
            assert peers[0][0] == INBOUND_SOURCE
        finally:
            pool.close()
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def test_a_handshake_done_in_connect_waits_for_no_writable_event(
    pod: Pod, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app is in the socket's own netns: the kernel completes the handshake inside
    `connect`, so nothing waits a loop iteration for it; a refused connect still waits."""
    waits: list[tuple[str, int]] = []
    real = tcp._writable

    async def counted(
        loop: asyncio.AbstractEventLoop, fd: int, timeout: float, address: tuple[str, int]
    ) -> None:
        waits.append(address)
        await real(loop, fd, timeout, address)

    monkeypatch.setattr(tcp, "_writable", counted)

    async def main() -> None:
        listener = socket_in(pod.netns, bind=("127.0.0.1", 0), listen=16)
        pool = UpstreamSockets(pod.netns, INBOUND_SOURCE)
        try:
            duplex = await connect_upstream(pool.take(), listener.getsockname())
            duplex.close()
            assert waits == []
            with pytest.raises(ConnectionRefusedError):
                await connect_upstream(pool.take(), ("127.0.0.1", 9))
            assert waits == [("127.0.0.1", 9)]
        finally:
            pool.close()
            listener.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_refused_or_unanswered_connect_raises_and_closes_the_socket(
    pod: Pod, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    async def main() -> None:
        pool = UpstreamSockets(pod.netns, None, batch=1)
        closed_port = ("127.0.0.1", 9)  # nothing listens in the fresh netns
        sock = pool.take()
        with pytest.raises(ConnectionRefusedError, match=re.escape("127.0.0.1:9")):
            await connect_upstream(sock, closed_port)
        assert sock.fileno() == -1
        sock = pool.take()
        with pytest.raises(TimeoutError, match=f"timed out.*{re.escape(DROPPED)}:80"):
            await connect_upstream(sock, (DROPPED, 80), timeout=0.2)
        assert sock.fileno() == -1
        pool.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
    assert sockets_in_netns(pod.netns.inode) == 0


def test_closing_the_pool_closes_its_spare_sockets_and_refuses_more(pod: Pod) -> None:
    async def main() -> None:
        pool = UpstreamSockets(pod.netns, INBOUND_SOURCE, batch=3)
        taken = pool.take()
        assert sockets_in_netns(pod.netns.inode) == 3
        pool.close()  # before the refill due this iteration: it must make none
        await asyncio.sleep(0)
        assert sockets_in_netns(pod.netns.inode) == 1  # the caller's own
        taken.close()
        with pytest.raises(NetnsClosed):
            pool.take()

    asyncio.run(main())
    assert sockets_in_netns(pod.netns.inode) == 0


def pod_proxy(pod: Pod) -> PodProxy:
    """ztunnel's proxy for ``pod`` (in-pod listeners and upstream sockets), certificates
    from a test CA; call inside a running loop."""
    ca = make_ca()
    ctx = ProxyContext(
        certs=CertManager(lambda sid: make_leaf(ca, sid)),
        connections=ConnectionTable(TcpMetrics(CollectorRegistry())),
    )
    info = node_pb2.PodInfo(uid="uid-ups", name="ups", namespace="demo")
    with Netns.open(pod.path) as borrowed:
        local = LocalPod.adopt(info, borrowed.fileno(), "cluster.local")
    return PodProxy(ctx, local)


def test_a_released_pod_leaves_no_socket_of_its_netns(pod: Pod) -> None:
    async def main() -> None:
        proxy = pod_proxy(pod)  # its three listeners
        proxy.upstream.take().close()
        await asyncio.sleep(0)
        assert sockets_in_netns(pod.netns.inode) == 3 + proxy.upstream.spare > 3
        await proxy.close()
        assert sockets_in_netns(pod.netns.inode) == 0
        with pytest.raises(NetnsClosed):
            proxy.upstream.take()

    asyncio.run(main())


def test_a_released_pod_ends_the_relays_its_handlers_left_running(pod: Pod) -> None:
    """A handler returns once its relay runs; the pod still tracks (and counts) the relay
    and ends it when released."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        proxy = pod_proxy(pod)
        started: asyncio.Future[asyncio.Future[Any]] = loop.create_future()

        async def handler(
            ctx: ProxyContext, pod: LocalPod, client: tcp.TcpDuplex
        ) -> asyncio.Future[Any]:
            relaying: asyncio.Future[Any] = loop.create_future()  # stands in for the relay
            started.set_result(relaying)
            return relaying

        ours, theirs = socket.socketpair()
        await loop.connect_accepted_socket(proxy._tracked(handler), ours)
        relaying = await asyncio.wait_for(started, 5)
        async with asyncio.timeout(5):
            while proxy._handlers != {relaying}:
                await asyncio.sleep(0.01)
        assert proxy.live_connections == 1
        await proxy.close()
        assert relaying.cancelled()
        assert proxy.live_connections == 0
        theirs.close()

    asyncio.run(main())
