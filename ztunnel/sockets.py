"""Socket helpers of the data path: original destinations and sockets made in pod netns."""

from __future__ import annotations

import socket
import struct

from mesh.hbone.connection import CONNECT_TIMEOUT
from mesh.hbone.tcp import TcpDuplex, connect_nonblocking, connect_tcp
from mesh.netns import Netns, sockets_in

SO_ORIGINAL_DST = 80
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008
# ztunnel's own ports in a pod netns: never a destination, or a tunnel would loop into itself
PROXY_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT})
INBOUND_SOURCE = "127.0.0.6"  # delivery source the BPF capture lets through (as Istio)
IP_BIND_ADDRESS_NO_PORT = 24  # Linux 4.2; Python's socket module does not name it
# Every upstream socket: no Nagle delay; a bound source address picks its port at connect
# (per destination, as an unbound socket does), so a socket made ahead holds no port.
UPSTREAM_OPTIONS = (
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
    (socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1),
)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """SO_ORIGINAL_DST: answered by our cgroup/getsockopt BPF program (or by iptables)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!H4s", raw, 2)
    return socket.inet_ntoa(addr), port


def upstream_socket(netns: Netns, source: str | None = None) -> socket.socket:
    """An unconnected TCP socket inside the pod's netns, optionally bound to ``source``."""
    (sock,) = sockets_in(netns, 1, bind=(source, 0) if source else None, options=UPSTREAM_OPTIONS)
    return sock


async def open_upstream(
    netns: Netns, address: tuple[str, int], source: str | None = None
) -> TcpDuplex:
    """A plain TCP connection from inside the pod's netns; the socket is closed on failure."""
    return await connect_upstream(upstream_socket(netns, source), address)


async def connect_upstream(
    sock: socket.socket, address: tuple[str, int], timeout: float = CONNECT_TIMEOUT
) -> TcpDuplex:
    """Connect a non-blocking socket of ours and wrap it; it is closed on failure."""
    try:
        await connect_nonblocking(sock, address, timeout)
        return await connect_tcp(sock)
    except BaseException:
        sock.close()
        raise
