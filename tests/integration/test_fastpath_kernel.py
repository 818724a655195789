"""The same-node fast path's kernel half on this kernel, without ztunnel: the agent's
programs (sockops tracking app sockets, fastpath.c's sk_msg redirect) and ztunnel's map
handle (ztunnel/fastpath_maps.py) against real sockets in two pod netns.

What it shows: bytes an app sent before the pairing keep their order ahead of redirected
ones; once paired, sends skip ztunnel's sockets in both directions; FIN and close still
travel the TCP connections (so ztunnel sees them); a slow reader pushes back on the
sender; a redirect whose target is gone falls back to the TCP connection.
"""

from __future__ import annotations

import os
import socket
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
MAX_SENDS = 10_000  # bound for filling socket buffers


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


def test_a_slow_reader_pushes_back_on_the_sender(
    lab: Lab, pinned: tuple[MeshBpf, FastPathMaps]
) -> None:
    mesh, maps = pinned
    maps.set_enabled(True)
    conn = connect(lab, mesh)
    pair(maps, conn)
    conn.client.setblocking(False)
    accepted = 0
    for _ in range(MAX_SENDS):
        try:
            accepted += conn.client.send(b"x" * 65536)
        except BlockingIOError:
            break
    else:
        pytest.fail(f"the sender never blocked ({accepted} bytes taken, the reader read none)")
    assert accepted < 64 * 1024 * 1024
    conn.client.setblocking(True)
    assert len(recv_exactly(conn.server, accepted)) == accepted
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
