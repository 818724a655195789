"""The one seam for "make this socket inside that network namespace".

setns(2) applies to the calling thread only, so the thread enters the namespace just long
enough to create (and optionally bind) a socket, then returns to where it was. The socket
keeps its namespace for life; the event loop never runs inside a foreign namespace.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import netns as _netns

_lock = threading.Lock()


@contextmanager
def entered(netns_fd: int) -> Iterator[None]:
    """Run the body with this thread inside the namespace behind ``netns_fd``."""
    with _lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _netns.setns(netns_fd)
            try:
                yield
            finally:
                _netns.setns(home)
        finally:
            os.close(home)


def socket_in(
    netns_fd: int,
    family: socket.AddressFamily = socket.AF_INET,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    bind: tuple[str, int] | None = None,
    listen: int | None = None,
    reuse: bool = True,
) -> socket.socket:
    """Create a socket in the namespace; bind and listen there when asked (ports are per netns)."""
    with entered(netns_fd):
        sock = socket.socket(family, kind)
        try:
            if reuse:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if bind is not None:
                sock.bind(bind)
            if listen is not None:
                sock.listen(listen)
        except BaseException:
            sock.close()
            raise
    sock.setblocking(False)
    return sock


def open_netns(path: str) -> int:
    """An fd for the namespace at ``path`` (/var/run/netns/NAME or /proc/PID/ns/net)."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
