"""The one seam for "make this socket inside that network namespace".

setns(2) applies to the calling thread only, so the thread enters the namespace just long
enough to create (and optionally bind) a socket, then returns to where it was. The socket
keeps its namespace for life; the event loop never runs inside a foreign namespace.

Namespaces are held as `Netns` handles, never as bare fd numbers: once a handle is closed
its number is forgotten, so a later `setns` cannot land in whatever namespace (or file)
the kernel gave that number to next.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

CLONE_NEWNET = 0x40000000
# setns(2) straight from libc (os.setns is Python 3.12+): pyroute2's wrapper cost every
# proxy process ~20 MiB of resident imports for this one call.
_libc = ctypes.CDLL(None, use_errno=True)

_lock = threading.Lock()
_home = threading.local()


class NetnsClosed(OSError):
    """The namespace handle was closed: its owner (a released pod) is gone."""


class Netns:
    """An owned fd on a network namespace; closing it makes every later use fail loudly."""

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name
        self.inode = os.fstat(fd).st_ino

    @classmethod
    def open(cls, path: str) -> Netns:
        """A handle on the namespace at ``path`` (/var/run/netns/NAME or /proc/PID/ns/net)."""
        return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC), path)

    @classmethod
    def dup(cls, fd: int, name: str) -> Netns:
        """A handle of our own on a borrowed fd (e.g. one received over SCM_RIGHTS)."""
        return cls(os.dup(fd), name)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The fd, for a call that needs it right now; never keep the number."""
        if self._fd < 0:
            raise NetnsClosed(f"network namespace {self.name} was released")
        return self._fd

    def close(self) -> None:
        # Under the lock: no thread is between fileno() and setns() while the fd goes.
        with _lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> Netns:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Netns {self.name} inode={self.inode}{' closed' if self.closed else ''}>"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _home_fd() -> int:
    """This thread's own namespace, opened once per thread (threads never move for good)."""
    fd: int | None = getattr(_home, "fd", None)
    if fd is None:
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        _home.fd = fd
    return fd


@contextmanager
def entered(ns: Netns) -> Iterator[None]:
    """Run the body with this thread inside ``ns``; raises `NetnsClosed` if it was released."""
    with _lock:
        home = _home_fd()
        _setns(ns.fileno())
        try:
            yield
        finally:
            _setns(home)


def socket_in(
    ns: Netns,
    family: socket.AddressFamily = socket.AF_INET,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    bind: tuple[str, int] | None = None,
    listen: int | None = None,
    reuse: bool = True,
    reuse_port: bool = False,
) -> socket.socket:
    """Create a socket in the namespace; bind and listen there when asked (ports are per netns).

    ``reuse_port`` lets two generations of a proxy listen on the same port at once.
    """
    options: list[tuple[int, int, int]] = []
    if reuse:
        options.append((socket.SOL_SOCKET, socket.SO_REUSEADDR, 1))
    if reuse_port:
        options.append((socket.SOL_SOCKET, socket.SO_REUSEPORT, 1))
    with entered(ns):
        sock = _socket(family, kind, options, bind)
        if listen is not None:
            try:
                sock.listen(listen)
            except BaseException:
                sock.close()
                raise
    return sock


def sockets_in(
    ns: Netns,
    count: int,
    *,
    bind: tuple[str, int] | None = None,
    options: Sequence[tuple[int, int, int]] = (),
) -> list[socket.socket]:
    """``count`` non-blocking TCP sockets made in the namespace with one pair of `setns`
    (the pair costs about as much as making the socket), each given the ``options``
    (level, name, value) and then bound to ``bind`` if asked. All or none: on an error the
    ones already made are closed."""
    made: list[socket.socket] = []
    try:
        with entered(ns):
            for _ in range(count):
                made.append(_socket(socket.AF_INET, socket.SOCK_STREAM, options, bind))
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


def _socket(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    options: Sequence[tuple[int, int, int]],
    bind: tuple[str, int] | None,
) -> socket.socket:
    """A non-blocking socket with ``options`` set, bound if asked; closed on any error."""
    sock = socket.socket(family, kind)
    try:
        for level, name, value in options:
            sock.setsockopt(level, name, value)
        if bind is not None:
            sock.bind(bind)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def write_sysctl(ns: Netns, key: str, value: str) -> None:
    """Set a per-namespace sysctl: /proc/sys/net shows the netns of the thread that opens it."""
    with entered(ns):
        Path("/proc/sys", key.replace(".", "/")).write_text(value)
