"""The same-node fast path's kernel half on this kernel, without ztunnel: the agent's
programs (sockops tracking app sockets, fastpath.c's sk_msg redirect) and ztunnel's map
handle (ztunnel/fastpath_maps.py) against real sockets in two pod netns.

What it shows: bytes an app sent before the pairing keep their order ahead of redirected
ones; once paired, sends skip ztunnel's sockets in both directions; FIN and close still
travel the TCP connections (so ztunnel sees them); a reader that does not read holds the
sender back after a bounded amount (at most FASTPATH_QUEUE_MAX in its receive queue, the
rest in the TCP connection's buffers), and the bytes stay in order across the switches
between receive queue and TCP connection; a redirect whose target is gone falls back to
the TCP connection.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bpf.loader import MeshBpf, purge_pins
from tests.integration.privileged import require_privileged
from tests.integration.test_bpf_datapath import POD_A, POD_B, REMOTE, Lab, accept, build_lab, enroll
from ztunnel.fastpath_maps import FastpathKey, FastPathMaps, key_of

pytestmark = pytest.mark.privileged

APP = ("127.0.0.1", 8080)
FASTPATH_SOURCE = "127.0.0.7"
QUEUE_MAX = 4 << 20  # FASTPATH_QUEUE_MAX in bpf/src/fastpath.c
FILL_BLOCKS = 1024  # 64 MiB: a sender the kernel holds back blocks long before


@pytest.fixture
def lab() -> Iterator[Lab]:
    with build_lab() as built:
        yield built


@pytest.fixture
def pinned() -> Iterator[tuple[MeshBpf, FastPathMaps]]:
    require_privileged()
    pin_dir = f"/sys/fs/bpf/amfastk{os.getpid()}"
    try:
        with MeshBpf(pin_dir=pin_dir) as mesh:
            maps = FastPathMaps.open(Path(pin_dir, "maps"))
            try:
                yield mesh, maps
            finally:
                maps.close()
    finally:
        purge_pins(pin_dir)


@dataclass
class Connection:
    """client app -> (Z1: ztunnel's accepted socket) ... (Z2: ztunnel's delivery) -> server app"""

    client: socket.socket
    z1: socket.socket
    z2: socket.socket
    server: socket.socket


def connect(lab: Lab, mesh: MeshBpf) -> Connection:
    mesh.attach_proxy(lab.cgroups["proxy"])
    pod_a = enroll(lab, mesh, "a", POD_A)
    enroll(lab, mesh, "b", POD_B)
    app = lab.listener("b", APP, cgroup="b")
    client = lab.client("a", cgroup="a")
    client.connect(REMOTE)  # redirected to ztunnel's 127.0.0.1:15001 in pod a
    z1 = accept(pod_a.outbound)
    z2 = lab.client("b", bind=(FASTPATH_SOURCE, 0))
    z2.connect(APP)
    return Connection(client, z1, z2, accept(app))


def pair(maps: FastPathMaps, conn: Connection) -> tuple[FastpathKey, FastpathKey]:
    """What ztunnel does: its sockets join the sockhash, each app socket names the other
    side's ztunnel socket. Returns the client app's and the server app's keys."""
    z1 = maps.join(conn.z1)
    z2 = maps.join(conn.z2)
    client, server = z1.reversed(), z2.reversed()
    assert maps.tracked(client) and maps.tracked(server), "sockops did not track the apps"
    maps.pair(client, z2, 0)
    maps.pair(server, z1, 0)
    return client, server


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def nothing_to_read(sock: socket.socket) -> bool:
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


def test_paired_apps_talk_in_the_kernel_in_order_and_fin_takes_tcp(
    lab: Lab, pinned: tuple[MeshBpf, FastPathMaps]
) -> None:
    mesh, maps = pinned
    maps.set_enabled(True)
    conn = connect(lab, mesh)
    conn.client.sendall(b"early ")  # before ztunnel decided: through ztunnel's socket
    client, server = pair(maps, conn)
    conn.client.sendall(b"second")  # paired, but "early " is still in user space: passes
    residue = recv_exactly(conn.z1, 12)
    assert residue == b"early second"
    conn.z2.sendall(residue)
    maps.pair(client, key_of(conn.z2), len(residue))  # ztunnel: relayed all it passed
    conn.client.sendall(b" fast")
    assert recv_exactly(conn.server, 17) == b"early second fast"
    assert nothing_to_read(conn.z1), "a redirected byte reached ztunnel's socket"

    conn.server.sendall(b"reply")
    assert recv_exactly(conn.client, 5) == b"reply"
    assert nothing_to_read(conn.z2)
    assert (maps.redirected(client), maps.redirected(server)) == (5, 5)

    # Half-close: the FIN takes the TCP connection, ztunnel sees it and passes it on.
    conn.client.shutdown(socket.SHUT_WR)
    assert conn.z1.recv(1) == b""
    conn.z2.shutdown(socket.SHUT_WR)
    assert conn.server.recv(1) == b""
    conn.server.sendall(b"after half-close")
    assert recv_exactly(conn.client, 16) == b"after half-close"
    # Close: the same way.
    conn.server.close()
    assert conn.z2.recv(1) == b""
    conn.z1.close()
    assert conn.client.recv(1) == b""
    assert maps.redirected(server) == 21


def fill(sock: socket.socket, start: int = 0) -> bytes:
    """Non-blocking sends of numbered 64 KiB blocks until the kernel takes no more."""
    sock.setblocking(False)
    sent = b""
    try:
        for number in range(start, start + FILL_BLOCKS):
            block = number.to_bytes(8, "big") * 8192
            try:
                taken = sock.send(block)
            except BlockingIOError:
                return sent
            sent += block[:taken]
            if taken < len(block):
                return sent
    finally:
        sock.setblocking(True)
        sock.settimeout(10)
    pytest.fail(f"the sender never blocked ({len(sent)} bytes taken, the reader read none)")


def kernel_bytes(mesh: MeshBpf, app: FastpathKey) -> tuple[int, int]:
    """(bytes redirected into the other app's receive queue, into ztunnel's TCP egress)."""
    found = mesh.table("fastpath_bytes")[app]
    return found.redirected - found.to_tcp, found.to_tcp


def numbered(first: int, count: int) -> bytes:
    return b"".join(n.to_bytes(8, "big") * 8192 for n in range(first, first + count))


def test_a_reader_that_does_not_read_bounds_what_the_kernel_holds(
    lab: Lab, pinned: tuple[MeshBpf, FastPathMaps]
) -> None:
    mesh, maps = pinned
    maps.set_enabled(True)
    conn = connect(lab, mesh)
    client, _ = pair(maps, conn)
    sent = fill(conn.client)
    queued, through_tcp = kernel_bytes(mesh, client)
    # The receive queue took at most its bound, then the TCP connection's buffers held the
    # sender back (unbounded, the kernel would have taken every send above). fastpath.c
    # counts a send the TCP connection cut short in full (its tracepoint corrects it
    # elsewhere): >=.
    assert 0 < queued <= QUEUE_MAX
    assert through_tcp > 0 and queued + through_tcp >= len(sent)
    # Read in order: the receive queue first, then what waited in the TCP connection.
    assert recv_exactly(conn.server, len(sent)) == sent
    # The send the TCP connection cut short was taken back (the sock_send_length
    # tracepoint), so the program knows everything was read: the queue again.
    conn.client.sendall(numbered(0, 1))
    assert recv_exactly(conn.server, 65536) == numbered(0, 1)
    assert kernel_bytes(mesh, client)[0] == queued + 65536
    assert nothing_to_read(conn.z1)


def test_once_everything_was_read_sends_take_the_receive_queue_again_in_order(
    lab: Lab, pinned: tuple[MeshBpf, FastPathMaps]
) -> None:
    mesh, maps = pinned
    maps.set_enabled(True)
    conn = connect(lab, mesh)
    client, _ = pair(maps, conn)
    first = numbered(0, 160)  # 10 MiB: more than the queue and the TCP buffers take
    conn.client.settimeout(None)  # blocking sends: counted exactly
    sender = threading.Thread(target=conn.client.sendall, args=(first,))
    sender.start()
    try:
        deadline = time.monotonic() + 10
        while kernel_bytes(mesh, client)[1] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        queued, through_tcp = kernel_bytes(mesh, client)
        assert 0 < queued <= QUEUE_MAX and through_tcp > 0, "never switched to TCP"
        assert recv_exactly(conn.server, len(first)) == first
    finally:
        sender.join(10)
    assert not sender.is_alive()
    conn.client.sendall(numbered(160, 1))
    assert recv_exactly(conn.server, 65536) == numbered(160, 1)
    queued_again, through_tcp_again = kernel_bytes(mesh, client)
    assert queued_again > queued, "everything was read, yet the queue was not used again"
    assert queued_again + through_tcp_again == len(first) + 65536
    assert nothing_to_read(conn.z1)


def test_a_redirect_whose_target_is_gone_takes_tcp(
    lab: Lab, pinned: tuple[MeshBpf, FastPathMaps]
) -> None:
    mesh, maps = pinned
    maps.set_enabled(True)
    conn = connect(lab, mesh)
    pair(maps, conn)
    conn.z2.close()  # leaves the sockhash with its last reference
    assert conn.server.recv(1) == b""
    conn.client.sendall(b"late")
    assert recv_exactly(conn.z1, 4) == b"late"


def test_switched_off_nothing_is_tracked(lab: Lab, pinned: tuple[MeshBpf, FastPathMaps]) -> None:
    mesh, maps = pinned
    maps.set_enabled(False)
    conn = connect(lab, mesh)
    assert not maps.tracked(maps.join(conn.z1).reversed())
    assert not maps.tracked(maps.join(conn.z2).reversed())
    conn.client.sendall(b"plain")
    assert recv_exactly(conn.z1, 5) == b"plain"
