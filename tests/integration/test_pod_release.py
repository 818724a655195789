"""A released pod takes everything bound to it down: ztunnel's real listeners in a real pod
netns, real mTLS tunnels in and out, real app sockets; then re-adding it serves at once.

No BPF here (the lab tests cover capture): the test dials the pod's HBONE port directly
from a peer namespace, and opens the pod's outbound pool by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry
from pyroute2 import IPRoute, NetNS, netns

from mesh import tls
from mesh.api import node_pb2
from mesh.cert_manager import CertManager
from mesh.hbone.connection import HboneClientConnection, HboneStream, serve
from mesh.hbone.protocol import ConnectRequest, HboneError, HboneStreamRefused, Status
from mesh.netns import Netns, NetnsClosed, socket_in
from mesh.spiffe import SpiffeId
from tests.integration.privileged import require_privileged
from tests.unit.certs import CertAuthority, make_ca, make_leaf
from ztunnel import proxy as proxy_module
from ztunnel.connections import ConnectionTable
from ztunnel.context import ProxyContext
from ztunnel.metrics import TcpMetrics
from ztunnel.proxy import Ztunnel, ZtunnelNotReady

pytestmark = pytest.mark.privileged

POD_IP = "198.18.250.1"
PEER_IP = "198.18.250.2"
APP_PORT = 8080
TIMEOUT = 10.0
SERVER = SpiffeId("cluster.local", "demo", "server")
CLIENT = SpiffeId("cluster.local", "demo", "client")
PEER = SpiffeId("cluster.local", "demo", "peer")


@dataclass
class Pair:
    pod: Netns
    peer: Netns
    pod_path: str
    spare_path: str  # an empty namespace, for a pod's re-created sandbox


@pytest.fixture
def pair() -> Iterator[Pair]:
    """Two namespaces joined by a veth: the pod and a peer (another node, as far as it knows)."""
    require_privileged()
    tag = f"amrel{secrets.token_hex(3)}"
    names = {role: f"{tag}-{role}" for role in ("pod", "peer", "spare")}
    handles: list[Netns] = []
    try:
        for name in names.values():
            netns.create(name)
        with IPRoute() as ipr:
            ipr.link("add", ifname=f"{tag}a", kind="veth", peer=f"{tag}b")
            ipr.link("set", index=ipr.link_lookup(ifname=f"{tag}a")[0], net_ns_fd=names["pod"])
            ipr.link("set", index=ipr.link_lookup(ifname=f"{tag}b")[0], net_ns_fd=names["peer"])
        for role, ifname, address in (("pod", f"{tag}a", POD_IP), ("peer", f"{tag}b", PEER_IP)):
            with NetNS(names[role]) as ns:
                index = ns.link_lookup(ifname=ifname)[0]
                ns.addr("add", index=index, address=address, prefixlen=24)
                ns.link("set", index=index, state="up")
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        paths = {role: f"/var/run/netns/{name}" for role, name in names.items()}
        handles = [Netns.open(paths["pod"]), Netns.open(paths["peer"])]
        yield Pair(handles[0], handles[1], paths["pod"], paths["spare"])
    finally:
        for handle in handles:
            handle.close()
        for name in names.values():
            if name in netns.listnetns():
                netns.remove(name)


@dataclass
class Echo:
    """A TCP echo app; remembers how many of its connections are still open."""

    open: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()


async def echo_tunnel(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
    await stream.accept()
    with contextlib.suppress(HboneError):
        while data := await stream.read():
            stream.write(data)
            await stream.drain()


async def until(check: object, what: str) -> None:
    assert callable(check)
    async with asyncio.timeout(TIMEOUT):
        while not check():
            await asyncio.sleep(0.02)


def task_file(task: asyncio.Task[object]) -> str:
    """The source file of the coroutine a task runs."""
    code = getattr(task.get_coro(), "cr_code", None)
    return code.co_filename if code is not None else ""


def netns_fds(inode: int) -> int:
    """How many of this process's fds refer to the namespace with this inode."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.stat(f"/proc/self/fd/{name}").st_ino == inode
    return count


async def roundtrip(stream: HboneStream, payload: bytes) -> bytes:
    stream.write(payload)
    await stream.drain()
    got = b""
    async with asyncio.timeout(TIMEOUT):
        while len(got) < len(payload):
            chunk = await stream.read()
            if not chunk:
                break
            got += chunk
    return got


@dataclass
class Rig:
    ca: CertAuthority
    ztunnel: Ztunnel
    app: Echo


@pytest.fixture
async def rig(pair: Pair) -> AsyncIterator[Rig]:
    ca = make_ca()
    ctx = ProxyContext(
        certs=CertManager(lambda sid: make_leaf(ca, sid)),
        connections=ConnectionTable(TcpMetrics(CollectorRegistry())),
    )
    app = Echo()
    app_server = await asyncio.start_server(
        app.handle, sock=socket_in(pair.pod, bind=(POD_IP, APP_PORT), listen=16)
    )
    ztunnel = Ztunnel(ctx)
    ztunnel.update_state("1", {})  # the controller's (empty) first snapshot
    try:
        yield Rig(ca, ztunnel, app)
    finally:
        await ztunnel.close()
        app_server.close()
        await until(lambda: app.open == 0, "the app's connections to end")


async def add_server_pod(rig: Rig, pair: Pair) -> None:
    info = node_pb2.PodInfo(
        uid="uid-server", name="server", namespace="demo", service_account="server",
        addresses=[POD_IP],
    )  # fmt: skip
    with Netns.open(pair.pod_path) as borrowed:  # the agent's fd, lent over SCM_RIGHTS
        await rig.ztunnel.add_pod(info, borrowed.fileno())
    await until(lambda: rig.ztunnel.pods["uid-server"].serving, "the pod's HBONE listener")


async def dial_pod(rig: Rig, pair: Pair) -> HboneClientConnection:
    return await HboneClientConnection.connect(
        socket_in(pair.peer, reuse=False),
        tls.client_context(make_leaf(rig.ca, CLIENT)),
        SERVER,
        address=(POD_IP, 15008),
    )


async def test_release_ends_tunnels_in_and_out_and_readd_serves_at_once(
    rig: Rig, pair: Pair
) -> None:
    peer_server = await serve(
        socket_in(pair.peer, bind=(PEER_IP, 15008), listen=16),
        tls.server_context(make_leaf(rig.ca, PEER)),
        echo_tunnel,
    )
    try:
        await add_server_pod(rig, pair)
        proxy = rig.ztunnel.pods["uid-server"]
        inbound_conn = await dial_pod(rig, pair)
        inbound = await inbound_conn.open_stream(f"{POD_IP}:{APP_PORT}")
        assert await roundtrip(inbound, b"in-1") == b"in-1"
        assert rig.app.open == 1
        assert proxy.live_connections == 1
        # The open tunnel keeps no task of ztunnel's: its admission ended once it relayed.
        assert [t for t in asyncio.all_tasks() if "ztunnel" in task_file(t)] == []
        assert len(rig.ztunnel.ctx.connections) == 1

        async def dial_peer() -> HboneClientConnection:
            return await HboneClientConnection.connect(
                socket_in(proxy.pod.netns, reuse=False),
                await rig.ztunnel.ctx.certs.client_context(proxy.pod.identity),
                PEER,
                address=(PEER_IP, 15008),
            )

        outbound = await proxy.pod.pool.open_stream((PEER, PEER_IP), dial_peer, f"{PEER_IP}:9")
        assert await roundtrip(outbound, b"out-1") == b"out-1"
        inode = proxy.pod.netns.inode
        assert netns_fds(inode) == 2  # the test's own handle and ztunnel's

        await rig.ztunnel.del_pod("uid-server")

        # The accepted tunnel connection is gone, not left serving CONNECTs for a dead pod.
        async with asyncio.timeout(TIMEOUT):
            await inbound_conn.wait_closed()
        with pytest.raises(HboneError):
            await inbound.read()
        # The connection dialed from the pod is gone with it, and so is the app's socket.
        with pytest.raises(HboneError):
            await outbound.read()
        assert len(proxy.pod.pool) == 0
        await until(lambda: rig.app.open == 0, "the app connection to close")
        await until(lambda: len(rig.ztunnel.ctx.connections) == 0, "the close to be counted")
        # ztunnel holds no fd on the namespace, and its handle refuses to be used again.
        assert netns_fds(inode) == 1
        with pytest.raises(NetnsClosed):
            socket_in(proxy.pod.netns)

        # Re-enrolled (the relabel none -> ambient case): the first call works.
        await add_server_pod(rig, pair)
        again = await (await dial_pod(rig, pair)).open_stream(f"{POD_IP}:{APP_PORT}")
        assert await roundtrip(again, b"in-2") == b"in-2"
        again.close()
    finally:
        peer_server.close()


async def test_readd_with_a_new_namespace_replaces_the_old_pod(rig: Rig, pair: Pair) -> None:
    """Same uid, different netns (the agent lost track of a re-created sandbox)."""
    await add_server_pod(rig, pair)
    old = rig.ztunnel.pods["uid-server"]
    conn = await dial_pod(rig, pair)
    info = old.pod.info
    with Netns.open(pair.spare_path) as other:
        await rig.ztunnel.add_pod(info, other.fileno())
    assert rig.ztunnel.pods["uid-server"] is not old
    assert old.closed and old.pod.netns.closed
    async with asyncio.timeout(TIMEOUT):
        await conn.wait_closed()


def test_a_closed_handle_never_reaches_a_reused_fd_number() -> None:
    require_privileged()
    devnull = os.open("/dev/null", os.O_RDONLY)
    handle = Netns.open("/proc/self/ns/net")
    number = handle.fileno()
    handle.close()
    os.dup2(devnull, number)  # what the next open() anywhere in the process may do
    try:
        with pytest.raises(NetnsClosed, match="released"):
            socket_in(handle)
    finally:
        os.close(number)
        os.close(devnull)


async def test_a_peer_of_another_trust_domain_is_refused(rig: Rig, pair: Pair) -> None:
    """Signed by our root, but for another trust domain: not a member of this mesh."""
    await add_server_pod(rig, pair)
    foreign = SpiffeId("other.example", "demo", "client")
    conn = await HboneClientConnection.connect(
        socket_in(pair.peer, reuse=False),
        tls.client_context(make_leaf(rig.ca, foreign)),
        SERVER,
        address=(POD_IP, 15008),
    )
    with pytest.raises(HboneStreamRefused) as refused:
        await conn.open_stream(f"{POD_IP}:{APP_PORT}")
    assert refused.value.status == Status.UNAUTHENTICATED
    assert rig.app.open == 0
    conn.close()


async def test_no_pod_is_served_before_the_first_config(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no mesh state every destination would look outside the mesh and leave in
    plaintext (seen in a handover): the pod is refused until the state is there."""
    monkeypatch.setattr(proxy_module, "CONFIG_WAIT_SECONDS", 0.2)
    ca = make_ca()
    ztunnel = Ztunnel(
        ProxyContext(
            certs=CertManager(lambda sid: make_leaf(ca, sid)),
            connections=ConnectionTable(TcpMetrics(CollectorRegistry())),
        )
    )
    info = node_pb2.PodInfo(uid="u", name="server", namespace="demo", addresses=[POD_IP])
    try:
        with Netns.open(pair.pod_path) as borrowed:
            with pytest.raises(ZtunnelNotReady, match="no configuration"):
                await ztunnel.add_pod(info, borrowed.fileno())
            assert ztunnel.pods == {}
            ztunnel.update_state("1", {})
            await ztunnel.add_pod(info, borrowed.fileno())
        assert set(ztunnel.pods) == {"u"}
    finally:
        await ztunnel.close()
