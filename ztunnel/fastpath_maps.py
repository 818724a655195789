"""ztunnel's handle on the agent's same-node fast-path maps (``bpf/src/fastpath.c``).

The agent loads and attaches every program and pins the maps; ztunnel only opens four
pinned maps and writes entries into them: its own two sockets of a connection into
``fastpath_socks``, the pairing of the two app sockets into ``fastpath_pairs``, and the
on/off switch ``fastpath_config`` that tells sockops to track app sockets. The structs
mirror ``bpf/src/maps.h`` (ztunnel does not import ``bpf/``; a unit test compares them
with ``bpf/maps.py``, which a privileged test compares with the C).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
from functools import cache
from pathlib import Path
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)

SO_NETNS_COOKIE = 71  # include/uapi/asm-generic/socket.h (Linux >= 5.14)
_BPF_ANY = 0
REOPEN_SECONDS = 5.0
DEFAULT_MAPS_DIR = Path("/sys/fs/bpf/ambimesh/maps")  # the agent's default --bpf-pin-dir
_Value = TypeVar("_Value", bound="ctypes._CData")
MAP_NAMES = ("fastpath_socks", "fastpath_bytes", "fastpath_pairs", "fastpath_config")


class FastpathKey(ctypes.Structure):
    """``struct fastpath_key``: a TCP socket as it sees itself (addresses network order,
    ports host order)."""

    _fields_ = (
        ("netns_cookie", ctypes.c_uint64),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("remote_port", ctypes.c_uint32),
    )

    def reversed(self) -> FastpathKey:
        """The key of the socket at the other end of this one's connection (same netns)."""
        return FastpathKey(
            self.netns_cookie, self.remote_ip4, self.local_ip4, self.remote_port, self.local_port
        )


class FastpathBytes(ctypes.Structure):
    """``struct fastpath_bytes``."""

    _fields_ = (
        ("passed", ctypes.c_uint64),
        ("redirected", ctypes.c_uint64),
        ("to_tcp", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("ingress", ctypes.c_uint64),
    )


class FastpathPair(ctypes.Structure):
    """``struct fastpath_pair``."""

    _fields_ = (("target", FastpathKey), ("relayed", ctypes.c_uint64), ("peer", FastpathKey))


class SocketLike(Protocol):
    """A socket or uvloop's pseudo-socket of a transport."""

    def fileno(self) -> int: ...

    def getsockname(self) -> tuple[str, int]: ...

    def getpeername(self) -> tuple[str, int]: ...

    def getsockopt(self, level: int, option: int, buflen: int) -> bytes: ...


def _ip4(address: str) -> int:
    value: int = struct.unpack("=I", socket.inet_aton(address))[0]
    return value


def key_of(sock: SocketLike) -> FastpathKey:
    """The key fastpath.c computes for ``sock`` (its netns cookie, its own view)."""
    (cookie,) = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))
    local_ip, local_port = sock.getsockname()[:2]
    remote_ip, remote_port = sock.getpeername()[:2]
    return FastpathKey(cookie, _ip4(local_ip), _ip4(remote_ip), local_port, remote_port)


class _Libbpf:
    def __init__(self) -> None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        lib.bpf_map_update_elem.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_uint64,
        ]
        lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
        for fn in ("bpf_obj_get", "bpf_map_update_elem", "bpf_map_lookup_elem"):
            getattr(lib, fn).restype = ctypes.c_int
        lib.bpf_map_delete_elem.restype = ctypes.c_int
        self.lib = lib


@cache
def _libbpf() -> _Libbpf:
    return _Libbpf()


def _check(result: int, what: str) -> None:
    """libbpf 1.x returns -errno."""
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result)}")


class FastPathMaps:
    """The four pinned maps, opened from the agent's ``<pin dir>/maps``."""

    def __init__(self, fds: dict[str, int]) -> None:
        self._fds = fds
        self._lib = _libbpf().lib

    @classmethod
    def open(cls, maps_dir: Path) -> FastPathMaps:
        """Raises OSError (ENOENT while the agent has not pinned them yet)."""
        try:
            lib = _libbpf().lib
        except OSError as exc:
            raise OSError(errno.ENOENT, f"libbpf.so.1: {exc}") from exc
        fds: dict[str, int] = {}
        try:
            for name in MAP_NAMES:
                fd = lib.bpf_obj_get(os.fsencode(maps_dir / name))
                _check(fd, f"opening {maps_dir / name}")
                fds[name] = fd
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return cls(fds)

    def set_enabled(self, enabled: bool) -> None:
        self._update("fastpath_config", ctypes.c_uint32(0), ctypes.c_uint32(int(enabled)))

    def join(self, sock: SocketLike) -> FastpathKey:
        """Put one of ztunnel's sockets into the sockhash, as a redirect target."""
        key = key_of(sock)
        self._update("fastpath_socks", key, ctypes.c_uint32(sock.fileno()))
        return key

    def tracked(self, app: FastpathKey) -> bool:
        """Whether sockops counted this app socket's sends from its first byte."""
        return self._lookup("fastpath_bytes", app, FastpathBytes()) is not None

    def pair(self, app: FastpathKey, target: FastpathKey, relayed: int) -> None:
        """``target`` is ztunnel's socket towards the other app (the pair's TCP connection);
        the other app's own socket, whose receive queue the kernel may fill directly, is
        the one at its other end."""
        self._update("fastpath_pairs", app, FastpathPair(target, relayed, target.reversed()))

    def unpair(self, app: FastpathKey) -> None:
        """From the next send on, the app socket's bytes take its TCP connection again."""
        self._delete("fastpath_pairs", app)

    def redirected(self, app: FastpathKey) -> int:
        """Bytes the app socket sent straight to its pair (0 if it was never tracked)."""
        found = self._lookup("fastpath_bytes", app, FastpathBytes())
        return int(found.redirected) if found is not None else 0

    def forget(self, app: FastpathKey) -> None:
        self._delete("fastpath_pairs", app)
        self._delete("fastpath_bytes", app)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _update(self, name: str, key: ctypes._CData, value: ctypes._CData) -> None:
        result = self._lib.bpf_map_update_elem(
            self._fds[name], ctypes.byref(key), ctypes.byref(value), _BPF_ANY
        )
        _check(result, f"updating {name}")

    def _lookup(self, name: str, key: ctypes._CData, value: _Value) -> _Value | None:
        result = self._lib.bpf_map_lookup_elem(
            self._fds[name], ctypes.byref(key), ctypes.byref(value)
        )
        if result == -errno.ENOENT:
            return None
        _check(result, f"reading {name}")
        return value

    def _delete(self, name: str, key: ctypes._CData) -> None:
        result = self._lib.bpf_map_delete_elem(self._fds[name], ctypes.byref(key))
        if result != -errno.ENOENT:
            _check(result, f"deleting from {name}")


def from_flags(enabled: bool, maps_dir: Path) -> SameNodeFastPath | None:
    """``--same-node-fast-path`` and ``--bpf-maps``; off also switches the kernel side off."""
    if enabled:
        return SameNodeFastPath(maps_dir)
    SameNodeFastPath.switch_off(maps_dir)
    return None


class SameNodeFastPath:
    """The switch and the agent's maps, opened on first use (and again later if the agent
    had not pinned them yet)."""

    def __init__(self, maps_dir: Path) -> None:
        self.maps_dir = maps_dir
        self._maps: FastPathMaps | None = None
        self._next_try = 0.0
        self._last_error = ""

    def maps(self) -> FastPathMaps | None:
        if self._maps is not None:
            return self._maps
        now = asyncio.get_running_loop().time()
        if now < self._next_try:
            return None
        self._next_try = now + REOPEN_SECONDS
        try:
            maps = FastPathMaps.open(self.maps_dir)
            maps.set_enabled(True)
        except OSError as exc:
            # Once per cause: an agent that left the fast path off keeps it off.
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                log.warning("same-node fast path relayed in user space: %s", exc)
            return None
        self._maps = maps
        log.info("same-node fast path: kernel redirect through %s", self.maps_dir)
        return maps

    @staticmethod
    def switch_off(maps_dir: Path) -> None:
        """Tell sockops to stop tracking app sockets (a ztunnel started without the flag)."""
        with contextlib.suppress(OSError):
            maps = FastPathMaps.open(maps_dir)
            try:
                maps.set_enabled(False)
            finally:
                maps.close()

    def close(self) -> None:
        if self._maps is not None:
            self._maps.close()
            self._maps = None
