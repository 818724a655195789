"""Socket helpers of the data path: original destinations and sockets made in pod netns."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct

from mesh.hbone.connection import CONNECT_TIMEOUT
from mesh.hbone.tcp import TcpDuplex
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
    """Connect a non-blocking socket of ours and wrap it; it is closed on failure.

    `connect_ex`, then a writer callback and a loop timer only if the handshake is not
    done yet: uvloop's `sock_connect` resolves the address in libuv's thread pool first
    (its numeric fast path needs a socket type, which it does not pass).
    """
    try:
        err = sock.connect_ex(address)
        loop = asyncio.get_running_loop()
        if err == errno.EINPROGRESS:
            if _connected(sock):
                err = 0
            else:
                await _writable(loop, sock.fileno(), timeout, address)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            # OSError picks the subclass (ConnectionRefusedError, ...) from the errno.
            raise OSError(err, os.strerror(err), f"{address[0]}:{address[1]}")
        _, duplex = await loop.create_connection(TcpDuplex, sock=sock)
        return duplex
    except BaseException:
        sock.close()
        raise


def _connected(sock: socket.socket) -> bool:
    """Already connected: to an address of the socket's own netns (the app, for inbound
    delivery) the kernel has finished the handshake by the time `connect` returns
    EINPROGRESS, so there is no writable event to wait a loop iteration for."""
    try:
        sock.getpeername()
    except OSError:
        return False  # still connecting (ENOTCONN), or failed: SO_ERROR tells after the wait
    return True


async def _writable(
    loop: asyncio.AbstractEventLoop, fd: int, timeout: float, address: tuple[str, int]
) -> None:
    """Wait until a connecting socket is writable (connected or failed), at most ``timeout``."""
    done = loop.create_future()
    loop.add_writer(fd, _settle, done, True)
    timer = loop.call_later(timeout, _settle, done, False)
    try:
        await done
    finally:
        loop.remove_writer(fd)
        timer.cancel()
    if not done.result():
        raise TimeoutError(
            errno.ETIMEDOUT, f"connect timed out after {timeout}s", f"{address[0]}:{address[1]}"
        )


def _settle(done: asyncio.Future[bool], writable: bool) -> None:
    """Writable (the writer callback) or timed out (the timer): the first one tells."""
    if not done.done():
        done.set_result(writable)
