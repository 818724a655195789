"""The eBPF data path on real network namespaces and cgroups.

Topology per test: a pod netns (198.18.1.2, veth to a "peer" netns at 198.18.1.1), a
second pod netns for the cross-pod test, a cgroup per pod and one for the "proxy"
(ztunnel). Sockets are made by short-lived children that join a cgroup first, because a
socket belongs to the cgroup of the process that created it, then handed back over
SCM_RIGHTS (as ztunnel hands its listener to the agent); the test then drives them with
timeouts from one process.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from pyroute2 import IPRoute, NetlinkError, NetNS, netns

from bpf.loader import BpfError, MeshBpf, PodAttachment, cgroup2_mount
from mesh.netns import Netns, socket_in
from tests.integration.privileged import require_privileged

pytestmark = pytest.mark.privileged

POD_A = "198.18.1.2"
PEER = "198.18.1.1"
POD_B = "198.18.2.2"
REMOTE = ("198.18.9.9", 80)
# How a dual-stack AF_INET6 socket (gRPC C-core, Java, Node.js) names REMOTE.
REMOTE_MAPPED = ("::ffff:198.18.9.9", 80)
POD_A6 = "fd00:a::2"
PEER6 = "fd00:a::1"
TIMEOUT = 3.0
SO_ORIGINAL_DST = 80
_IFA_F_NODAD = 0x02  # include/uapi/linux/if_addr.h

_ids = itertools.count()


@dataclass
class Lab:
    """What a test gets: names, fds and cgroup paths; everything is torn down afterwards."""

    tag: str
    namespaces: dict[str, Netns] = field(default_factory=dict)
    cgroups: dict[str, str] = field(default_factory=dict)
    sockets: list[socket.socket] = field(default_factory=list)

    def own(self, *socks: socket.socket) -> None:
        for sock in socks:
            sock.settimeout(TIMEOUT)
        self.sockets.extend(socks)

    def make_in_cgroup(
        self, cgroup: str | None, make: Callable[[], list[socket.socket]]
    ) -> list[socket.socket]:
        """Sockets created by a child process that joined ``cgroup`` (None: this one's)."""
        socks = _sockets_from_child(self.cgroups[cgroup] if cgroup else None, make)
        self.own(*socks)
        return socks

    def listener(
        self, ns: str, address: tuple[str, int], cgroup: str | None = None
    ) -> socket.socket:
        handle = self.namespaces[ns]
        (sock,) = self.make_in_cgroup(cgroup, lambda: [socket_in(handle, bind=address, listen=16)])
        return sock

    def client(
        self,
        ns: str,
        cgroup: str | None = None,
        kind: socket.SocketKind = socket.SOCK_STREAM,
        bind: tuple[str, int] | None = None,
    ) -> socket.socket:
        handle = self.namespaces[ns]
        (sock,) = self.make_in_cgroup(cgroup, lambda: [socket_in(handle, kind=kind, bind=bind)])
        return sock

    def dual_stack_client(
        self, ns: str, cgroup: str | None = None, kind: socket.SocketKind = socket.SOCK_STREAM
    ) -> socket.socket:
        """An AF_INET6 socket that also reaches IPv4 as ::ffff:a.b.c.d (IPV6_V6ONLY off)."""
        handle = self.namespaces[ns]

        def make() -> list[socket.socket]:
            sock = socket_in(handle, family=socket.AF_INET6, kind=kind)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            return [sock]

        (sock,) = self.make_in_cgroup(cgroup, make)
        return sock

    def add_ipv6(self) -> str | None:
        """Put POD_A6 and PEER6 on the pod-peer veth; None, or why this netns cannot."""
        for role, ifname, address in (
            ("a", f"{self.tag}a", POD_A6),
            ("peer", f"{self.tag}p", PEER6),
        ):
            try:
                with NetNS(f"{self.tag}-{role}") as ns:
                    index = ns.link_lookup(ifname=ifname)[0]
                    # No duplicate address detection: the address is usable at once.
                    ns.addr("add", index=index, address=address, prefixlen=64, flags=_IFA_F_NODAD)
            except NetlinkError as exc:  # no IPv6 in this kernel, or disabled in the netns
                return f"cannot add an IPv6 address in the test netns: {exc}"
        return None


def _sockets_from_child(
    cgroup_path: str | None, make: Callable[[], list[socket.socket]]
) -> list[socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # child: join the cgroup, make the sockets, pass them back, exit
        code = 1
        try:
            ours.close()
            if cgroup_path is not None:
                with open(os.path.join(cgroup_path, "cgroup.procs"), "w") as procs:
                    procs.write(str(os.getpid()))
            socks = make()
            socket.send_fds(theirs, [b"ok"], [s.fileno() for s in socks])
            code = 0
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                theirs.sendall(f"error: {exc!r}".encode())
        finally:
            os._exit(code)
    theirs.close()
    try:
        ours.settimeout(TIMEOUT)
        msg, fds, _, _ = socket.recv_fds(ours, 4096, 8)
    finally:
        ours.close()
        _reap(pid)
    if msg != b"ok":
        for fd in fds:
            os.close(fd)
        raise RuntimeError(f"socket-making child failed: {msg.decode(errors='replace')}")
    return [socket.socket(fileno=fd) for fd in fds]


def _reap(pid: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@contextlib.contextmanager
def build_lab() -> Iterator[Lab]:
    require_privileged()
    tag = f"bpft{os.getpid() % 100000}x{next(_ids)}"
    lab = Lab(tag)
    names = {role: f"{tag}-{role}" for role in ("a", "b", "peer")}
    mount = cgroup2_mount()
    try:
        for role, name in names.items():
            netns.create(name)
            lab.namespaces[role] = Netns.open(f"/var/run/netns/{name}")
        with IPRoute() as ipr:
            ipr.link("add", ifname=f"{tag}a", kind="veth", peer=f"{tag}p")
            ipr.link("set", index=ipr.link_lookup(ifname=f"{tag}a")[0], net_ns_fd=names["a"])
            ipr.link("set", index=ipr.link_lookup(ifname=f"{tag}p")[0], net_ns_fd=names["peer"])
        for role, ifname, address in (("a", f"{tag}a", POD_A), ("peer", f"{tag}p", PEER)):
            with NetNS(names[role]) as ns:
                index = ns.link_lookup(ifname=ifname)[0]
                ns.addr("add", index=index, address=address, prefixlen=24)
                ns.link("set", index=index, state="up")
        for role in names:
            with NetNS(names[role]) as ns:
                ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        for role in ("a", "b", "proxy"):
            path = os.path.join(mount, f"ambimesh-test-{tag}-{role}")
            os.mkdir(path)
            lab.cgroups[role] = path
        yield lab
    finally:
        for sock in lab.sockets:
            sock.close()
        for handle in lab.namespaces.values():
            handle.close()
        for path in lab.cgroups.values():
            _remove_cgroup(path, mount)
        for name in names.values():
            if name in netns.listnetns():
                netns.remove(name)


def _remove_cgroup(path: str, mount: str) -> None:
    """Move stragglers out (cgroups can only be removed empty), then rmdir."""
    with open(os.path.join(path, "cgroup.procs")) as procs:
        pids = procs.read().split()
    for pid in pids:
        with contextlib.suppress(OSError), open(os.path.join(mount, "cgroup.procs"), "w") as root:
            root.write(pid)
    os.rmdir(path)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with build_lab() as built:
        yield built


@pytest.fixture
def mesh() -> Iterator[MeshBpf]:
    require_privileged()
    with MeshBpf() as loaded:
        yield loaded


@dataclass
class Pod:
    attachment: PodAttachment
    outbound: socket.socket  # ztunnel's 127.0.0.1:15001 in the pod netns
    inbound: socket.socket  # ztunnel's 0.0.0.0:15006 in the pod netns


def enroll(lab: Lab, mesh: MeshBpf, role: str, address: str) -> Pod:
    outbound = lab.listener(role, ("127.0.0.1", 15001), cgroup="proxy")
    inbound = lab.listener(role, ("0.0.0.0", 15006), cgroup="proxy")
    mesh.set_inbound_listener(address, inbound.fileno())
    attachment = mesh.attach_pod(lab.cgroups[role], lab.namespaces[role].fileno(), [address])
    return Pod(attachment, outbound, inbound)


def original_dst(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    (family,) = struct.unpack("=H", raw[:2])  # sockaddr_in: family host order, rest network
    port, packed = struct.unpack("!H4s", raw[2:8])
    assert family == socket.AF_INET
    return socket.inet_ntoa(packed), port


def accept(listener: socket.socket) -> socket.socket:
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    return conn


def nothing_pending(listener: socket.socket) -> bool:
    listener.settimeout(0.2)
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        return True
    finally:
        listener.settimeout(TIMEOUT)
    conn.close()
    return False


def test_outbound_connect_lands_on_ztunnel_with_original_destination(
    lab: Lab, mesh: MeshBpf
) -> None:
    mesh.attach_proxy(lab.cgroups["proxy"])
    pod = enroll(lab, mesh, "a", POD_A)
    app = lab.client("a", cgroup="a")
    app.connect(REMOTE)
    with accept(pod.outbound) as conn:
        assert original_dst(conn) == REMOTE
        assert app.getpeername() == REMOTE
        assert conn.getsockname() == ("127.0.0.1", 15001)
        app.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        # Other options on the proxy's socket are untouched.
        assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM
    counts = mesh.counters()
    assert counts["outbound_redirected"] == 1
    assert counts["outbound_established"] == 1
    assert counts["original_dst_answered"] == 1


def test_dual_stack_connect_to_v4_mapped_address_lands_on_ztunnel(lab: Lab, mesh: MeshBpf) -> None:
    """gRPC C-core, Java and Node.js dial an IPv4 target from an AF_INET6 socket, which
    runs connect6, not connect4: uncaptured, it would leave the pod in plaintext."""
    mesh.attach_proxy(lab.cgroups["proxy"])
    pod = enroll(lab, mesh, "a", POD_A)
    app = lab.dual_stack_client("a", cgroup="a")
    app.connect(REMOTE_MAPPED)
    with accept(pod.outbound) as conn:
        assert original_dst(conn) == REMOTE
        # sockops filed it under the IPv4 client address the proxy sees.
        assert app.getsockname()[0] == "::ffff:127.0.0.1"
        assert conn.getpeername() == ("127.0.0.1", app.getsockname()[1])
        assert app.getpeername() == (*REMOTE_MAPPED, 0, 0)
        app.sendall(b"hello")
        assert conn.recv(5) == b"hello"
    counts = mesh.counters()
    assert counts["outbound_redirected"] == 1
    assert counts["outbound_established"] == 1
    assert counts["original_dst_answered"] == 1


def test_genuine_ipv6_destination_is_left_alone(lab: Lab, mesh: MeshBpf) -> None:
    """The mesh is IPv4-only: connect6 passes an IPv6 destination through untouched."""
    pod = enroll(lab, mesh, "a", POD_A)
    why_not = lab.add_ipv6()
    if why_not is not None:
        pytest.skip(why_not)
    peer = lab.namespaces["peer"]
    (remote,) = lab.make_in_cgroup(
        None, lambda: [socket_in(peer, family=socket.AF_INET6, bind=(PEER6, 80), listen=16)]
    )
    app = lab.dual_stack_client("a", cgroup="a")
    app.connect((PEER6, 80))
    with accept(remote) as conn:
        assert conn.getpeername()[:2] == app.getsockname()[:2]
    assert app.getsockname()[0] == POD_A6
    assert app.getpeername()[:2] == (PEER6, 80)
    assert nothing_pending(pod.outbound)
    assert mesh.counters()["outbound_redirected"] == 0


def test_unknown_connection_keeps_kernel_answer(lab: Lab, mesh: MeshBpf) -> None:
    """A connection the programs did not redirect gets the kernel's error, not garbage."""
    mesh.attach_proxy(lab.cgroups["proxy"])
    pod = enroll(lab, mesh, "a", POD_A)
    direct = lab.client("a")  # not in the pod cgroup: ztunnel's own kind of socket
    direct.connect(("127.0.0.1", 15001))
    with accept(pod.outbound) as conn, pytest.raises(OSError) as raised:
        original_dst(conn)
    assert raised.value.errno in (errno.ENOPROTOOPT, errno.ENOENT)


def test_two_pods_with_the_same_client_tuple_get_their_own_destination(
    lab: Lab, mesh: MeshBpf
) -> None:
    mesh.attach_proxy(lab.cgroups["proxy"])
    pod_a = enroll(lab, mesh, "a", POD_A)
    pod_b = enroll(lab, mesh, "b", POD_B)
    # Same client address and port in both netns: only the netns cookie tells them apart.
    app_a = lab.client("a", cgroup="a", bind=("127.0.0.1", 40000))
    app_b = lab.client("b", cgroup="b", bind=("127.0.0.1", 40000))
    app_a.connect(("198.18.9.1", 8001))
    app_b.connect(("198.18.9.2", 8002))
    with accept(pod_a.outbound) as conn_a, accept(pod_b.outbound) as conn_b:
        assert conn_a.getpeername() == conn_b.getpeername() == ("127.0.0.1", 40000)
        assert original_dst(conn_b) == ("198.18.9.2", 8002)
        assert original_dst(conn_a) == ("198.18.9.1", 8001)
    assert app_a.getpeername() == ("198.18.9.1", 8001)
    assert app_b.getpeername() == ("198.18.9.2", 8002)


def test_udp_and_loopback_are_not_redirected(lab: Lab, mesh: MeshBpf) -> None:
    pod = enroll(lab, mesh, "a", POD_A)
    dns = lab.client("peer", kind=socket.SOCK_DGRAM, bind=(PEER, 53))
    udp = lab.client("a", cgroup="a", kind=socket.SOCK_DGRAM)
    udp.connect((PEER, 53))
    assert udp.getpeername() == (PEER, 53)
    udp.send(b"query")
    assert dns.recvfrom(16) == (b"query", udp.getsockname())
    udp6 = lab.dual_stack_client("a", cgroup="a", kind=socket.SOCK_DGRAM)
    udp6.connect((f"::ffff:{PEER}", 53))
    udp6.send(b"query6")
    assert dns.recvfrom(16) == (b"query6", (POD_A, udp6.getsockname()[1]))

    local = lab.listener("a", ("127.0.0.1", 7000))
    app = lab.client("a", cgroup="a")
    app.connect(("127.0.0.1", 7000))
    with accept(local) as conn:
        assert conn.getpeername() == app.getsockname()
    assert app.getpeername() == ("127.0.0.1", 7000)
    app6 = lab.dual_stack_client("a", cgroup="a")
    app6.connect(("::ffff:127.0.0.1", 7000))
    with accept(local) as conn:
        assert conn.getpeername() == ("127.0.0.1", app6.getsockname()[1])
    assert app6.getpeername() == ("::ffff:127.0.0.1", 7000, 0, 0)
    assert nothing_pending(pod.outbound)
    assert mesh.counters()["outbound_redirected"] == 0


def test_inbound_is_steered_to_ztunnel_except_loopback_hbone_and_excluded(
    lab: Lab, mesh: MeshBpf
) -> None:
    pod = enroll(lab, mesh, "a", POD_A)
    app = lab.listener("a", ("0.0.0.0", 8080))
    hbone = lab.listener("a", ("0.0.0.0", 15008))
    metrics = lab.listener("a", ("0.0.0.0", 9090))
    mesh.set_excluded_ports([9090])

    # From another netns over the veth: captured, original destination in getsockname().
    outside = lab.client("peer")
    outside.connect((POD_A, 8080))
    with accept(pod.inbound) as conn:
        assert conn.getsockname() == (POD_A, 8080)
        assert conn.getpeername() == outside.getsockname()
    # From inside the pod with a non-loopback source: captured too.
    inside = lab.client("a", bind=(POD_A, 0))
    inside.connect((POD_A, 8080))
    with accept(pod.inbound) as conn:
        assert conn.getsockname() == (POD_A, 8080)
    assert nothing_pending(app)

    # ztunnel delivering to the app from 127.0.0.6: not captured again.
    delivery = lab.client("a", bind=("127.0.0.6", 0))
    delivery.connect((POD_A, 8080))
    with accept(app) as conn:
        assert conn.getpeername()[0] == "127.0.0.6"
    # HBONE and excluded ports go straight to their listeners.
    for port, listener in ((15008, hbone), (9090, metrics)):
        client = lab.client("peer")
        client.connect((POD_A, port))
        with accept(listener) as conn:
            assert conn.getsockname() == (POD_A, port)
    assert nothing_pending(pod.inbound)
    assert mesh.counters()["inbound_steered"] == 2


@pytest.mark.parametrize("how", ["remove_inbound_listener", "listener_closed"])
def test_inbound_fails_closed_without_ztunnel(lab: Lab, mesh: MeshBpf, how: str) -> None:
    pod = enroll(lab, mesh, "a", POD_A)
    app = lab.listener("a", ("0.0.0.0", 8080))
    if how == "remove_inbound_listener":
        mesh.remove_inbound_listener(POD_A)
    else:
        pod.inbound.close()
    outside = lab.client("peer")
    outside.settimeout(0.5)
    with pytest.raises(OSError):
        outside.connect((POD_A, 8080))
    assert nothing_pending(app)
    assert mesh.counters()["inbound_dropped"] >= 1


def test_detach_restores_normal_behaviour(lab: Lab, mesh: MeshBpf) -> None:
    proxy = mesh.attach_proxy(lab.cgroups["proxy"])
    assert mesh.attach_proxy(lab.cgroups["proxy"]) is proxy
    assert mesh.attached_programs() == 1
    pod = enroll(lab, mesh, "a", POD_A)
    # getsockopt + connect4/6, sockops, getpeername4/6, link
    assert mesh.attached_programs() == 7
    with pytest.raises(BpfError, match="already attached"):
        mesh.attach_pod(lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A])
    mesh.detach_pod(pod.attachment)
    mesh.detach_pod(pod.attachment)  # idempotent
    mesh.detach_proxy(proxy)
    mesh.detach_proxy(proxy)
    assert len(mesh.table("enrolled_pods")) == 0
    assert mesh.attached_programs() == 0

    remote = lab.listener("peer", (PEER, 80))
    app = lab.client("a", cgroup="a")
    app.connect((PEER, 80))
    with accept(remote) as conn:
        assert conn.getpeername() == app.getsockname()
    assert app.getpeername() == (PEER, 80)
    app6 = lab.dual_stack_client("a", cgroup="a")
    app6.connect((f"::ffff:{PEER}", 80))
    with accept(remote) as conn:
        assert conn.getpeername() == (POD_A, app6.getsockname()[1])
    assert app6.getpeername() == (f"::ffff:{PEER}", 80, 0, 0)

    server = lab.listener("a", ("0.0.0.0", 8080))
    outside = lab.client("peer")
    outside.connect((POD_A, 8080))
    with accept(server) as conn:
        assert conn.getsockname() == (POD_A, 8080)
    assert nothing_pending(pod.outbound)
    assert nothing_pending(pod.inbound)

    # Attaching again after a detach works.
    again = mesh.attach_pod(lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A])
    mesh.detach_pod(again)


def test_close_detaches_everything(lab: Lab) -> None:
    require_privileged()
    with MeshBpf() as mesh:
        mesh.attach_proxy(lab.cgroups["proxy"])
        pod = enroll(lab, mesh, "a", POD_A)
    assert not pod.attachment.active
    remote = lab.listener("peer", (PEER, 80))
    app = lab.client("a", cgroup="a")
    app.connect((PEER, 80))
    with accept(remote):
        pass
    with pytest.raises(BpfError, match="closed"):
        mesh.counters()


def test_restarted_agent_takes_over_programs_left_attached(lab: Lab) -> None:
    """Legacy cgroup attachments outlive their loader; the next one replaces them."""
    require_privileged()
    with MeshBpf() as crashed:
        crashed.attach_proxy(lab.cgroups["proxy"])
        crashed.attach_pod(lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A])
        with MeshBpf() as restarted:
            restarted.attach_proxy(lab.cgroups["proxy"])
            pod = enroll(lab, restarted, "a", POD_A)
            app = lab.client("a", cgroup="a")
            app.connect(REMOTE)
            with accept(pod.outbound) as conn:
                assert original_dst(conn) == REMOTE
            assert restarted.counters()["outbound_redirected"] == 1
            assert crashed.counters()["outbound_redirected"] == 0
