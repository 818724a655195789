"""The one owner of ambimesh's eBPF programs: compile, load, attach, detach, map access.

The agent decides; this module only carries out. All programs are compiled by bcc as one
translation unit (``source()``), so they share one set of maps. ``python -m bpf --dump``
prints that exact text.

Cgroup programs are attached the legacy way (``BPF_PROG_ATTACH`` with
``BPF_F_ALLOW_MULTI``), not as BPF links, on purpose: a link lives only as long as a file
descriptor refers to it, so an agent crash would silently detach ``connect4`` and a
STRICT pod's outbound traffic would leave the pod in plaintext. A legacy attachment stays
with the cgroup until it is detached or the cgroup goes away, so after a crash the pod
keeps being redirected to ztunnel (fail closed). ``ALLOW_MULTI`` lets other programs on
the same cgroup (a CNI, systemd accounting) coexist with ours. The price: a restarted
agent finds its predecessor's programs still attached, so ``attach_pod`` and
``attach_proxy`` take over, detaching same-named ambimesh programs after attaching theirs.
With a ``pin_dir`` each agent pins its cgroup programs at ``<pin_dir>/progs/<name>``, so
that its successor can open them by path to detach them: by id
(``BPF_PROG_GET_FD_BY_ID``) Linux 6.1 opens them only for CAP_SYS_ADMIN.

The netns ``sk_lookup`` program can only be attached as a link (``bpf_link_create``),
which dies with the last fd or bpffs pin referring to it. So with a ``pin_dir`` (on a bpf
filesystem) each pod's link is pinned at ``<pin_dir>/links/<pin_key>`` and every map at
``<pin_dir>/maps/<name>``: an agent that exits (``release()``) or crashes leaves its pods
captured, STRICT pods failing closed, and the next agent adopts the pinned links
(``bpf_link_update`` to its own program) and reuses the maps, including the SOCKHASH of
ztunnel's listeners, which the programs its predecessor left attached keep using too.
Without a ``pin_dir`` everything lives only as long as this process (tests).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from bpf.maps import COUNTERS, ip4_key

__all__ = [
    "DEFAULT_BPFFS",
    "DEFAULT_HBONE_PORT",
    "DEFAULT_INBOUND_PORT",
    "DEFAULT_OUTBOUND_PORT",
    "DEFAULT_PIN_DIR",
    "BpfError",
    "MeshBpf",
    "PodAttachment",
    "ProxyAttachment",
    "cflags",
    "cgroup2_mount",
    "check_environment",
    "ensure_bpffs",
    "purge_pins",
]

log = logging.getLogger(__name__)

DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
DEFAULT_HBONE_PORT = 15008
DEFAULT_BPFFS = "/sys/fs/bpf"
DEFAULT_PIN_DIR = f"{DEFAULT_BPFFS}/ambimesh"

SRC_DIR = Path(__file__).resolve().parent / "src"
# Order matters: the shared header first, then one file per attach point.
SOURCE_FILES = (
    "maps.h",
    "connect4.c",
    "connect6.c",
    "sockops.c",
    "getsockopt.c",
    "getpeername4.c",
    "getpeername6.c",
    "sk_lookup.c",
    "fastpath.c",
)

# From include/uapi/linux/bpf.h.
_PROG_SOCK_OPS = 13
_PROG_SK_MSG = 16
_PROG_CGROUP_SOCK_ADDR = 18
_PROG_CGROUP_SOCKOPT = 25
_PROG_SK_LOOKUP = 30
_ATTACH_CGROUP_SOCK_OPS = 3
_ATTACH_SK_MSG_VERDICT = 7
_ATTACH_CGROUP_INET4_CONNECT = 10
_ATTACH_CGROUP_INET6_CONNECT = 11
_ATTACH_CGROUP_GETSOCKOPT = 21
_ATTACH_CGROUP_INET4_GETPEERNAME = 29
_ATTACH_CGROUP_INET6_GETPEERNAME = 30
_ATTACH_SK_LOOKUP = 36
_BPF_F_ALLOW_MULTI = 1 << 1
_BPF_ANY = 0
_BPF_CGROUP_MAX_PROGS = 64
_INFO_SIZE = 256  # >= sizeof(struct bpf_{prog,map,link}_info) on this kernel; it fills less
_LINK_TYPE_NETNS = 5
_BPF_FS_MAGIC = 0xCAFE4A11
# bpffs refuses names containing '.'; a key is one path component.
_PIN_KEY = re.compile(r"[A-Za-z0-9_:-]{1,200}")

# (function, program type, expected attach type) for each program. connect6 and
# getpeername6 serve dual-stack AF_INET6 sockets dialing v4-mapped addresses (no connect4).
_POD_CGROUP_PROGRAMS = (
    ("ambimesh_connect4", _PROG_CGROUP_SOCK_ADDR, _ATTACH_CGROUP_INET4_CONNECT),
    ("ambimesh_connect6", _PROG_CGROUP_SOCK_ADDR, _ATTACH_CGROUP_INET6_CONNECT),
    ("ambimesh_sockops", _PROG_SOCK_OPS, _ATTACH_CGROUP_SOCK_OPS),
    ("ambimesh_getpeername4", _PROG_CGROUP_SOCK_ADDR, _ATTACH_CGROUP_INET4_GETPEERNAME),
    ("ambimesh_getpeername6", _PROG_CGROUP_SOCK_ADDR, _ATTACH_CGROUP_INET6_GETPEERNAME),
)
_PROXY_PROGRAM = ("ambimesh_getsockopt", _PROG_CGROUP_SOCKOPT, _ATTACH_CGROUP_GETSOCKOPT)
_SK_LOOKUP_PROGRAM = ("ambimesh_sk_lookup", _PROG_SK_LOOKUP, _ATTACH_SK_LOOKUP)
# Attached to the fastpath_socks map, not to a cgroup: the map holds it (and its pin the
# map), so it outlives the agent like the cgroup programs; the next agent's replaces it.
_FASTPATH_PROGRAM = ("ambimesh_fastpath", _PROG_SK_MSG, _ATTACH_SK_MSG_VERDICT)
# On the sock_recv_length and sock_send_length tracepoints, held by this process (see
# _attach_fastpath_counters).
_FASTPATH_COUNTERS = {
    b"sock_recv_length": b"ambimesh_fastpath_read",
    b"sock_send_length": b"ambimesh_fastpath_sent",
}


class BpfError(Exception):
    """Anything that went wrong loading, attaching or updating ambimesh's eBPF programs."""


@dataclass(eq=False)
class PodAttachment:
    """One enrolled pod: programs on its cgroup, an sk_lookup link on its netns.

    With a ``pin_key`` the link is pinned at ``<pin_dir>/links/<pin_key>``.
    """

    cgroup_path: str
    addresses: tuple[str, ...]
    link_fd: int
    cgroup_fd: int = field(repr=False)
    active: bool = True
    pin_key: str | None = None


@dataclass(eq=False)
class ProxyAttachment:
    """The getsockopt program on ztunnel's cgroup."""

    cgroup_path: str
    cgroup_fd: int = field(repr=False)
    active: bool = True


def cgroup2_mount() -> str:
    """Where the cgroup v2 hierarchy is mounted (from /proc/mounts)."""
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return parts[1]
    raise BpfError(
        "no cgroup v2 hierarchy is mounted; mount one "
        "(mount -t cgroup2 none /sys/fs/cgroup/unified) or run scripts/setup.sh"
    )


def cflags(
    outbound_port: int = DEFAULT_OUTBOUND_PORT,
    inbound_port: int = DEFAULT_INBOUND_PORT,
    hbone_port: int = DEFAULT_HBONE_PORT,
) -> list[str]:
    """The compiler flags that go with ``source()``: include path and ports."""
    ports = {"outbound": outbound_port, "inbound": inbound_port, "hbone": hbone_port}
    for name, port in ports.items():
        if not isinstance(port, int) or not 0 < port < 65536:
            raise BpfError(f"{name} port must be an integer in 1..65535, got {port!r}")
    if len(set(ports.values())) != len(ports):
        raise BpfError(f"outbound, inbound and HBONE ports must differ, got {ports}")
    return [
        f"-I{SRC_DIR}",
        f"-DAMBIMESH_OUTBOUND_PORT={outbound_port}",
        f"-DAMBIMESH_INBOUND_PORT={inbound_port}",
        f"-DAMBIMESH_HBONE_PORT={hbone_port}",
    ]


def check_environment() -> None:
    """Raise BpfError saying what to fix unless this process can load and attach the programs."""
    if os.geteuid() != 0:
        raise BpfError("eBPF, cgroups and network namespaces need root; run the agent as root")
    cgroup2_mount()
    MeshBpf().close()


def ensure_bpffs(path: str = DEFAULT_BPFFS) -> None:
    """Mount a bpf filesystem at ``path`` unless one is there: pins can only live on bpffs."""
    if _is_bpffs(path):
        return
    libc = _libc()
    if libc.mount(b"bpf", os.fsencode(path), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BpfError(
            f"no bpf filesystem at {path} and mounting one failed ({os.strerror(err)}); "
            f"mount it (mount -t bpf bpf {path}) or run scripts/setup.sh"
        )
    log.info("mounted a bpf filesystem at %s", path)


def purge_pins(pin_dir: str) -> None:
    """Remove a pin dir and everything pinned under it (``ambimesh lab down``); idempotent.

    Links whose pin goes and that no process holds are detached; maps live on while an
    attached program still uses them. Refuses anything but a directory inside a bpffs.
    """
    if not os.path.lexists(pin_dir):
        return
    if not _is_bpffs(pin_dir) or os.path.ismount(pin_dir):
        raise BpfError(f"{pin_dir} is not a directory inside a bpf filesystem; not removing it")
    try:
        shutil.rmtree(pin_dir)
    except OSError as exc:
        raise BpfError(f"cannot remove pin dir {pin_dir}: {exc}") from exc


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    return libc


def _is_bpffs(path: str) -> bool:
    """statfs(2)'s f_type (the first field) is BPF_FS_MAGIC; False if ``path`` is missing."""
    buf = ctypes.create_string_buffer(256)  # >= sizeof(struct statfs)
    if _libc().statfs(os.fsencode(path), buf) != 0:
        return False
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF == _BPF_FS_MAGIC


def _prepare_pin_dir(pin_dir: str) -> None:
    """Mount bpffs if needed, check ``pin_dir`` is on it, create its maps/, links/, progs/."""
    ensure_bpffs()
    existing = pin_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not _is_bpffs(existing):
        raise BpfError(
            f"pin dir {pin_dir} is not on a bpf filesystem; use one under {DEFAULT_BPFFS}"
        )
    try:
        for sub in ("maps", "links", "progs"):
            os.makedirs(os.path.join(pin_dir, sub), exist_ok=True)
    except OSError as exc:
        raise BpfError(
            f"cannot create pin dir {pin_dir} ({exc.strerror}); names on bpffs cannot contain '.'"
        ) from exc


class _MapShape(NamedTuple):
    """What must agree between a pinned map and the C declaration for a program to use it."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


class _LinkInfo(NamedTuple):
    """The fields of struct bpf_link_info ambimesh reads (``netns_*`` only for netns links)."""

    type: int
    id: int
    prog_id: int
    netns_ino: int
    attach_type: int


def _bcc_maps(libbcc_name: str, module: int) -> list[tuple[str, int, _MapShape]]:
    """Name, fd and declared shape of every map bcc made for ``module``.

    bcc's Python binding exposes no declared key/leaf sizes for a SOCKHASH, so this asks
    libbcc, through a handle of its own to leave bcc's argtypes alone.
    """
    lib = ctypes.CDLL(libbcc_name)
    lib.bpf_num_tables.restype = ctypes.c_size_t
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    for fn, restype in (
        ("bpf_table_name", ctypes.c_char_p),
        ("bpf_table_fd_id", ctypes.c_int),
        ("bpf_table_type_id", ctypes.c_int),
        ("bpf_table_key_size_id", ctypes.c_size_t),
        ("bpf_table_leaf_size_id", ctypes.c_size_t),
        ("bpf_table_max_entries_id", ctypes.c_size_t),
        ("bpf_table_flags_id", ctypes.c_int),
    ):
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    maps = []
    for i in range(lib.bpf_num_tables(module)):
        shape = _MapShape(
            lib.bpf_table_type_id(module, i),
            lib.bpf_table_key_size_id(module, i),
            lib.bpf_table_leaf_size_id(module, i),
            lib.bpf_table_max_entries_id(module, i),
            lib.bpf_table_flags_id(module, i),
        )
        maps.append((lib.bpf_table_name(module, i).decode(), lib.bpf_table_fd_id(module, i), shape))
    return maps


class _Libbpf:
    """The few libbpf calls bcc's Python API lacks (links, pins, SOCKHASH, attach errnos)."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as exc:
            raise BpfError(
                f"cannot load libbpf.so.1 ({exc}); install libbpf1 or run scripts/setup.sh"
            ) from exc
        c_int, c_void_p, c_uint, c_uint64, c_char_p = (
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_char_p,
        )
        lib.bpf_link_create.argtypes = [c_int, c_int, c_int, c_void_p]
        lib.bpf_link_update.argtypes = [c_int, c_int, c_void_p]
        lib.bpf_link_detach.argtypes = [c_int]
        lib.bpf_obj_pin.argtypes = [c_int, c_char_p]
        lib.bpf_obj_get.argtypes = [c_char_p]
        lib.bpf_map_update_elem.argtypes = [c_int, c_void_p, c_void_p, c_uint64]
        lib.bpf_map_delete_elem.argtypes = [c_int, c_void_p]
        lib.bpf_prog_attach.argtypes = [c_int, c_int, c_int, c_uint]
        lib.bpf_prog_detach2.argtypes = [c_int, c_int, c_int]
        lib.bpf_prog_query.argtypes = [c_int, c_int, c_uint, c_void_p, c_void_p, c_void_p]
        lib.bpf_prog_get_fd_by_id.argtypes = [c_uint]
        lib.bpf_obj_get_info_by_fd.argtypes = [c_int, c_void_p, c_void_p]
        for fn in (
            "bpf_link_create",
            "bpf_link_update",
            "bpf_link_detach",
            "bpf_obj_pin",
            "bpf_obj_get",
            "bpf_map_update_elem",
            "bpf_map_delete_elem",
            "bpf_prog_attach",
            "bpf_prog_detach2",
            "bpf_prog_query",
            "bpf_prog_get_fd_by_id",
            "bpf_obj_get_info_by_fd",
        ):
            getattr(lib, fn).restype = c_int
        self._lib = lib

    @staticmethod
    def _check(result: int, what: str) -> int:
        """libbpf 1.x returns -errno; turn that into OSError."""
        if result < 0:
            raise OSError(-result, f"{what}: {os.strerror(-result)}")
        return result

    def link_create(self, prog_fd: int, target_fd: int, attach_type: int) -> int:
        return self._check(
            self._lib.bpf_link_create(prog_fd, target_fd, attach_type, None), "bpf_link_create"
        )

    def link_update(self, link_fd: int, prog_fd: int) -> None:
        """Run ``prog_fd`` instead of the link's program, atomically (no unattached gap)."""
        self._check(self._lib.bpf_link_update(link_fd, prog_fd, None), "bpf_link_update")

    def link_detach(self, link_fd: int) -> None:
        self._check(self._lib.bpf_link_detach(link_fd), "bpf_link_detach")

    def link_info(self, link_fd: int) -> _LinkInfo:
        """struct bpf_link_info: type, id, prog_id, then a union aligned to 8 (offset 16)."""
        raw = self._info(link_fd)
        return _LinkInfo(
            *(int.from_bytes(raw[at : at + 4], sys.byteorder) for at in (0, 4, 8, 16, 20))
        )

    def map_shape(self, map_fd: int) -> _MapShape:
        """struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags."""
        raw = self._info(map_fd)
        return _MapShape(
            *(int.from_bytes(raw[at : at + 4], sys.byteorder) for at in (0, 8, 12, 16, 20))
        )

    def obj_pin(self, fd: int, path: str) -> None:
        self._check(self._lib.bpf_obj_pin(fd, os.fsencode(path)), "bpf_obj_pin")

    def obj_get(self, path: str) -> int:
        return self._check(self._lib.bpf_obj_get(os.fsencode(path)), "bpf_obj_get")

    def prog_attach(self, prog_fd: int, target_fd: int, attach_type: int, flags: int) -> None:
        self._check(
            self._lib.bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "bpf_prog_attach"
        )

    def prog_detach(self, prog_fd: int, target_fd: int, attach_type: int) -> None:
        self._check(self._lib.bpf_prog_detach2(prog_fd, target_fd, attach_type), "bpf_prog_detach2")

    def prog_query(self, target_fd: int, attach_type: int) -> list[int]:
        """IDs of the programs attached to ``target_fd`` for ``attach_type``."""
        ids = (ctypes.c_uint32 * _BPF_CGROUP_MAX_PROGS)()
        count = ctypes.c_uint32(_BPF_CGROUP_MAX_PROGS)
        self._check(
            self._lib.bpf_prog_query(
                target_fd, attach_type, 0, None, ctypes.byref(ids), ctypes.byref(count)
            ),
            "bpf_prog_query",
        )
        return list(ids[: count.value])

    def prog_fd_by_id(self, prog_id: int) -> int:
        return self._check(self._lib.bpf_prog_get_fd_by_id(prog_id), "bpf_prog_get_fd_by_id")

    def prog_id_and_name(self, prog_fd: int) -> tuple[int, str]:
        """From struct bpf_prog_info: id at offset 4, name[16] at offset 64."""
        raw = self._info(prog_fd)
        prog_id = int.from_bytes(raw[4:8], sys.byteorder)
        name = raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
        return prog_id, name

    def _info(self, fd: int) -> bytes:
        """The struct bpf_*_info of a program, map or link fd."""
        info = ctypes.create_string_buffer(_INFO_SIZE)
        size = ctypes.c_uint32(_INFO_SIZE)
        self._check(
            self._lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)),
            "bpf_obj_get_info_by_fd",
        )
        return info.raw

    def map_update(self, map_fd: int, key: ctypes._CData, value: ctypes._CData) -> None:
        self._check(
            self._lib.bpf_map_update_elem(map_fd, ctypes.byref(key), ctypes.byref(value), _BPF_ANY),
            "bpf_map_update_elem",
        )

    def map_delete(self, map_fd: int, key: ctypes._CData) -> None:
        self._check(self._lib.bpf_map_delete_elem(map_fd, ctypes.byref(key)), "bpf_map_delete_elem")


class MeshBpf:
    """ambimesh's programs, compiled and loaded once; attaches them to pods and to ztunnel.

    Not thread-safe: one owner (the agent's enrollment loop) calls it. Call
    ``set_inbound_listener`` for a pod before ``attach_pod`` to avoid a window in which
    inbound connections are dropped (an enrolled pod without a listener fails closed).

    With ``pin_dir`` (see the module docstring) the maps are pinned and shared by every
    MeshBpf with that ``pin_dir``; end an agent with ``release()`` to leave pods captured,
    with ``close()`` to stop capturing them.
    """

    def __init__(
        self,
        outbound_port: int = DEFAULT_OUTBOUND_PORT,
        inbound_port: int = DEFAULT_INBOUND_PORT,
        hbone_port: int = DEFAULT_HBONE_PORT,
        pin_dir: str | None = None,
    ) -> None:
        self.pin_dir = None if pin_dir is None else os.path.abspath(pin_dir)
        # Which agent's tracepoint programs count, should two share the pinned maps.
        self._reader_token = int.from_bytes(os.urandom(4), "little") % 0xFFFFFFFE + 1
        flags = [*cflags(outbound_port, inbound_port, hbone_port)]
        flags.append(f"-DAMBIMESH_READER_TOKEN={self._reader_token}")
        if self.pin_dir is not None:
            _prepare_pin_dir(self.pin_dir)
        self.outbound_port = outbound_port
        self.inbound_port = inbound_port
        self.hbone_port = hbone_port
        try:
            import bcc
        except ImportError as exc:
            raise BpfError(
                f"cannot import bcc ({exc}); install python3-bpfcc and expose it to this "
                "interpreter (run scripts/setup.sh)"
            ) from exc
        self._libbpf = _Libbpf()
        try:
            self._bpf: Any = bcc.BPF(text=self.source().encode(), cflags=flags)
        except Exception as exc:
            raise BpfError(
                f"compiling the eBPF programs failed ({exc}); is the kernel built with "
                "CONFIG_BPF_SYSCALL, are kernel headers installed (run scripts/setup.sh)? "
                "`python -m bpf --dump` prints the C that was compiled."
            ) from exc
        if self.pin_dir is not None:
            try:
                self._share_pinned_maps(bcc.lib._name, os.path.join(self.pin_dir, "maps"))
            except BaseException:
                self._bpf.cleanup()
                raise
        self._fns: dict[str, Any] = {}
        try:
            for name, prog_type, attach_type in (
                *_POD_CGROUP_PROGRAMS,
                _PROXY_PROGRAM,
                _SK_LOOKUP_PROGRAM,
            ):
                expected = -1 if prog_type == _PROG_SOCK_OPS else attach_type
                self._fns[name] = self._bpf.load_func(
                    name.encode(), prog_type, attach_type=expected
                )
            self._listeners_fd = int(bcc.lib.bpf_table_fd(self._bpf.module, b"inbound_listeners"))
            self._fastpath_socks_fd = int(bcc.lib.bpf_table_fd(self._bpf.module, b"fastpath_socks"))
        except Exception as exc:
            self._bpf.cleanup()
            raise BpfError(
                f"the kernel rejected an eBPF program ({exc}); this needs Linux >= 5.15 with "
                "CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF; `python -m bpf --dump` prints the C"
            ) from exc
        self.fast_path = self._attach_fast_path()
        # Fds of the previous agent's cgroup programs (from their pins), by program id.
        self._predecessors: dict[int, int] = {}
        if self.pin_dir is not None:
            try:
                self._pin_programs(os.path.join(self.pin_dir, "progs"))
            except BaseException:
                self._close_predecessors()
                self._bpf.cleanup()
                raise
        self._pods: dict[str, PodAttachment] = {}
        self._proxies: dict[str, ProxyAttachment] = {}
        self._closed = False

    @staticmethod
    def source() -> str:
        """The exact C compiled (with ``cflags()``): the shared header, then each program."""
        parts = []
        for name in SOURCE_FILES:
            parts.append(f"/* ---- bpf/src/{name} ---- */\n")
            parts.append((SRC_DIR / name).read_text(encoding="utf-8"))
        return "".join(parts)

    # -- pods --------------------------------------------------------------------------

    def attach_pod(
        self,
        cgroup_path: str,
        netns_fd: int,
        addresses: Sequence[str],
        pin_key: str | None = None,
    ) -> PodAttachment:
        """Capture a pod: connect4/6, sockops, getpeername4/6 on its cgroup; sk_lookup on its netns.

        With ``pin_key`` (needs ``pin_dir``) the netns link is pinned so inbound capture
        outlives this process, and a link already pinned under that key for this netns
        (by a previous agent) is adopted and switched to this object's program rather
        than doubled; one pinned for another netns (deleted or replaced) is replaced.
        """
        self._check_open()
        keys = [_pod_ip_key(address) for address in addresses]
        pin_path = None if pin_key is None else self._link_pin_path(pin_key)
        path = os.path.realpath(cgroup_path)
        if path in self._pods:
            raise BpfError(f"cgroup {path} is already attached; detach_pod it first")
        if pin_key is not None and any(pod.pin_key == pin_key for pod in self._pods.values()):
            raise BpfError(f"pin key {pin_key!r} is already used by another attached pod")
        cgroup_fd = _open_cgroup(path)
        attached: list[tuple[str, int]] = []
        link_fd = -1
        adopted = False
        try:
            for name, _, attach_type in _POD_CGROUP_PROGRAMS:
                self._cgroup_attach(name, cgroup_fd, attach_type, path)
                attached.append((name, attach_type))
            link_fd, adopted = self._sk_lookup_link(netns_fd, pin_path)
            table = self._bpf[b"enrolled_pods"]
            for key in keys:
                table[table.Key(key)] = table.Leaf(1)
        except BaseException:
            if adopted:
                os.close(link_fd)  # it was pinned before: leave it to the next try
            elif link_fd >= 0:
                self._drop_link(link_fd, pin_path)
            for name, attach_type in attached:
                self._cgroup_detach(name, cgroup_fd, attach_type)
            os.close(cgroup_fd)
            raise
        attachment = PodAttachment(path, tuple(addresses), link_fd, cgroup_fd, pin_key=pin_key)
        self._pods[path] = attachment
        return attachment

    def detach_pod(self, attachment: PodAttachment) -> None:
        """Undo attach_pod, including the pod's map entries and link pin; safe to call twice."""
        if not attachment.active:
            return
        attachment.active = False
        self._pods.pop(attachment.cgroup_path, None)
        pin_key = attachment.pin_key
        self._drop_link(
            attachment.link_fd, None if pin_key is None else self._link_pin_path(pin_key)
        )
        for name, _, attach_type in _POD_CGROUP_PROGRAMS:
            self._cgroup_detach(name, attachment.cgroup_fd, attach_type)
        os.close(attachment.cgroup_fd)
        self._forget_addresses(attachment.addresses)

    def pinned_pods(self) -> set[str]:
        """Pin keys of the pods with a pinned link, also those a previous agent pinned.

        After a restart the agent ``unpin_pod``s those it no longer wants.
        """
        self._check_open()
        return set(os.listdir(self._links_dir()))

    def unpin_pod(
        self,
        pin_key: str,
        addresses: Sequence[str] = (),
        cgroup_path: str | None = None,
    ) -> None:
        """Stop capturing a pod known only by its pin (e.g. a previous agent's); idempotent.

        The pin records neither addresses nor cgroup: pass ``addresses`` to also forget the
        pod's map entries, ``cgroup_path`` to also detach the cgroup programs a previous
        agent left there (a deleted cgroup took them along).
        """
        self._check_open()
        pin_path = self._link_pin_path(pin_key)
        for address in addresses:
            _pod_ip_key(address)
        for pod in list(self._pods.values()):
            if pod.pin_key == pin_key:
                self.detach_pod(pod)
        try:
            link_fd = self._libbpf.obj_get(pin_path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise BpfError(f"cannot open the link pinned at {pin_path}: {exc}") from exc
        else:
            self._drop_link(link_fd, pin_path)
        self._forget_addresses(addresses)
        if cgroup_path is not None and os.path.exists(cgroup_path):
            path = os.path.realpath(cgroup_path)
            cgroup_fd = _open_cgroup(path)
            try:
                for name, _, attach_type in _POD_CGROUP_PROGRAMS:
                    self._detach_stale(name, cgroup_fd, attach_type, path)
            finally:
                os.close(cgroup_fd)

    # -- ztunnel -----------------------------------------------------------------------

    def attach_proxy(self, cgroup_path: str) -> ProxyAttachment:
        """Answer SO_ORIGINAL_DST for ztunnel's sockets; idempotent for the same path."""
        self._check_open()
        path = os.path.realpath(cgroup_path)
        existing = self._proxies.get(path)
        if existing is not None:
            return existing
        cgroup_fd = _open_cgroup(path)
        name, _, attach_type = _PROXY_PROGRAM
        try:
            self._cgroup_attach(name, cgroup_fd, attach_type, path)
        except BaseException:
            os.close(cgroup_fd)
            raise
        attachment = ProxyAttachment(path, cgroup_fd)
        self._proxies[path] = attachment
        return attachment

    def detach_proxy(self, attachment: ProxyAttachment) -> None:
        """Undo attach_proxy; safe to call twice."""
        if not attachment.active:
            return
        attachment.active = False
        self._proxies.pop(attachment.cgroup_path, None)
        name, _, attach_type = _PROXY_PROGRAM
        self._cgroup_detach(name, attachment.cgroup_fd, attach_type)
        os.close(attachment.cgroup_fd)

    # -- maps --------------------------------------------------------------------------

    def set_inbound_listener(self, address: str, sock_fd: int) -> None:
        """Steer inbound connections for pod ``address`` to this listening TCP socket."""
        self._check_open()
        key = ctypes.c_uint32(_pod_ip_key(address))
        try:
            self._libbpf.map_update(self._listeners_fd, key, ctypes.c_uint64(sock_fd))
        except OSError as exc:
            raise BpfError(
                f"cannot use fd {sock_fd} as the inbound listener for {address} ({exc.strerror}); "
                "it must be a listening TCP socket"
            ) from exc

    def remove_inbound_listener(self, address: str) -> None:
        """Forget pod ``address``'s listener (its inbound traffic is then dropped); idempotent."""
        self._check_open()
        key = ctypes.c_uint32(_pod_ip_key(address))
        try:
            self._libbpf.map_delete(self._listeners_fd, key)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise BpfError(f"cannot remove the inbound listener for {address}: {exc}") from exc

    def set_excluded_ports(self, ports: Iterable[int]) -> None:
        """Replace the set of inbound ports never captured (for every pod)."""
        self._check_open()
        wanted = set()
        for port in ports:
            if not isinstance(port, int) or not 0 < port < 65536:
                raise BpfError(f"excluded port must be an integer in 1..65535, got {port!r}")
            wanted.add(port)
        table = self._bpf[b"excluded_ports"]
        for key in list(table.keys()):
            if key.value not in wanted:
                del table[key]
        for port in wanted:
            table[table.Key(port)] = table.Leaf(1)

    def counters(self) -> dict[str, int]:
        """Totals over all CPUs, for the agent's ``ambimesh_*`` metrics."""
        self._check_open()
        table = self._bpf[b"counters"]
        return {name: int(table.sum(table.Key(i)).value) for i, name in enumerate(COUNTERS)}

    def attached_programs(self) -> int:
        """How many of this object's attachments the kernel reports in force right now
        (cgroup programs by query, netns links by their info), for the health metric."""
        self._check_open()
        ids = {name: self._libbpf.prog_id_and_name(fn.fd)[0] for name, fn in self._fns.items()}
        sk_lookup = ids[_SK_LOOKUP_PROGRAM[0]]
        cgroups = [
            (pod.cgroup_fd, name, attach_type)
            for pod in self._pods.values()
            if pod.active
            for name, _, attach_type in _POD_CGROUP_PROGRAMS
        ]
        cgroups += [
            (proxy.cgroup_fd, _PROXY_PROGRAM[0], _PROXY_PROGRAM[2])
            for proxy in self._proxies.values()
            if proxy.active
        ]
        count = 0
        for cgroup_fd, name, attach_type in cgroups:
            with contextlib.suppress(OSError):
                count += ids[name] in self._libbpf.prog_query(cgroup_fd, attach_type)
        for pod in self._pods.values():
            if pod.active:
                with contextlib.suppress(OSError):
                    info = self._libbpf.link_info(pod.link_fd)
                    count += info.prog_id == sk_lookup and info.netns_ino != 0
        return count

    def table(self, name: str) -> Any:
        """bcc's view of a map, for inspection and tests (not for SOCKHASH)."""
        self._check_open()
        return self._bpf[name.encode()]

    # -- lifetime ----------------------------------------------------------------------

    def release(self) -> None:
        """Close this object's fds but detach and unpin nothing; then it is unusable.

        For an agent that exits while its pods must stay captured (upgrade, restart): the
        cgroup programs stay attached, pinned links and maps stay, so pods keep being
        redirected and STRICT pods fail closed until the next MeshBpf with this
        ``pin_dir`` takes over. Links attached without a ``pin_key`` die here.
        """
        if self._closed:
            return
        self._closed = True
        try:
            for pod in self._pods.values():
                if pod.pin_key is None:
                    log.warning("inbound capture of %s stops: its link is not pinned", pod)
                pod.active = False
                os.close(pod.link_fd)
                os.close(pod.cgroup_fd)
            for proxy in self._proxies.values():
                proxy.active = False
                os.close(proxy.cgroup_fd)
            self._pods.clear()
            self._proxies.clear()
        finally:
            self._close_predecessors()
            self._bpf.cleanup()

    def close(self) -> None:
        """Detach (and unpin) what this object attached, unload the programs; idempotent.

        Pinned maps stay (``purge_pins`` removes them).
        """
        if self._closed:
            return
        try:
            for pod in list(self._pods.values()):
                self.detach_pod(pod)
            for proxy in list(self._proxies.values()):
                self.detach_proxy(proxy)
            name, _, attach_type = _FASTPATH_PROGRAM
            if name in self._fns:
                with contextlib.suppress(OSError):  # a newer agent's may have replaced it
                    fd = self._fns[name].fd
                    self._libbpf.prog_detach(fd, self._fastpath_socks_fd, attach_type)
            self._unpin_programs()
        finally:
            self._closed = True
            self._close_predecessors()
            self._bpf.cleanup()

    def __enter__(self) -> MeshBpf:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------

    def _attach_fast_path(self) -> bool:
        """Load fastpath.c's sk_msg program onto fastpath_socks, with its counters; whether
        the same-node fast path is on.

        The fast path only saves work: a kernel whose verifier refuses its program (one
        this code was not tested on) leaves it off, and capture runs. The pin of
        fastpath_socks goes then, so ztunnel finds no fast path and relays those
        connections in user space, as it does without an agent; sockops stops tracking.
        """
        name, prog_type, attach_type = _FASTPATH_PROGRAM
        try:
            fn = self._bpf.load_func(name.encode(), prog_type, attach_type=-1)
            self._libbpf.prog_attach(fn.fd, self._fastpath_socks_fd, attach_type, 0)
        except Exception as exc:  # bcc raises plain Exception, libbpf OSError
            log.warning(
                "same-node fast path off: the kernel refused %s (%s); ztunnel relays "
                "same-node connections in user space",
                name,
                exc,
            )
            self._bpf[b"fastpath_config"][ctypes.c_int(0)] = ctypes.c_uint32(0)
            if self.pin_dir is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.pin_dir, "maps", "fastpath_socks"))
            return False
        self._fns[name] = fn
        self._attach_fastpath_counters()
        return True

    def _attach_fastpath_counters(self) -> None:
        """Count what fast-path apps read and really sent (fastpath.c), where the kernel has
        both tracepoints (Linux >= 6.4); without them fastpath.c keeps to the TCP
        connections. From here on only this agent's programs count; they stop when this
        process ends."""
        try:
            for tracepoint, function in _FASTPATH_COUNTERS.items():
                self._bpf.attach_raw_tracepoint(tp=tracepoint, fn_name=function)
        except Exception as exc:  # bcc raises plain Exception
            log.info("same-node fast path without receive queues: %s", exc)
            return
        self._bpf[b"fastpath_config"][ctypes.c_int(1)] = ctypes.c_uint32(self._reader_token)

    def _check_open(self) -> None:
        if self._closed:
            raise BpfError("this MeshBpf is closed; create a new one")

    def _share_pinned_maps(self, libbcc_name: str, map_pin_dir: str) -> None:
        """Use the map pinned at ``<map_pin_dir>/<name>`` for each map; pin ours where none is.

        Opened by path (``BPF_OBJ_GET``, CAP_BPF), not as bcc's BPF_TABLE_PINNED does, by
        id (``BPF_MAP_GET_FD_BY_ID``, CAP_SYS_ADMIN on Linux 6.1). bcc has already written
        each map's fd number into the programs' bytecode, which ``load_func`` loads later,
        so the pinned map is dup'ed onto that number: the programs, bcc's tables and this
        class all use it, and the map bcc made is freed. A pinned map of another shape
        (another ambimesh version) would be misread by the programs: refused.
        """
        for name, fd, declared in _bcc_maps(libbcc_name, self._bpf.module):
            path = os.path.join(map_pin_dir, name)
            pinned_fd = self._open_pinned_map(path)
            if pinned_fd is None:
                try:
                    self._libbpf.obj_pin(fd, path)
                    continue
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise BpfError(f"cannot pin map {name} at {path}: {exc}") from exc
                pinned_fd = self._open_pinned_map(path)  # another loader pinned it meanwhile
                if pinned_fd is None:
                    raise BpfError(f"the map pinned at {path} vanished while loading")
            try:
                pinned = self._libbpf.map_shape(pinned_fd)
                if pinned != declared:
                    raise BpfError(
                        f"the map pinned at {path} is {pinned} but this ambimesh needs "
                        f"{declared}: another version made it. Remove the pin dir "
                        f"{self.pin_dir} and start the agent again: on a node, stop agent and "
                        "ztunnel and run `ambimesh uninstall` (pods are not captured until "
                        "the agent is back); in the lab, `ambimesh lab down`"
                    )
                os.dup2(pinned_fd, fd, inheritable=False)
            finally:
                os.close(pinned_fd)

    def _pin_programs(self, progs_dir: str) -> None:
        """Pin our cgroup programs in ``progs_dir`` in place of the previous agent's.

        Keeps an fd of each program pinned before, for ``_detach_stale``.
        """
        for name, _, _ in (*_POD_CGROUP_PROGRAMS, _PROXY_PROGRAM):
            path = os.path.join(progs_dir, name)
            try:
                old_fd = self._libbpf.obj_get(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise BpfError(f"cannot open the program pinned at {path}: {exc}") from exc
            else:
                self._predecessors[self._libbpf.prog_id_and_name(old_fd)[0]] = old_fd
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                self._libbpf.obj_pin(self._fns[name].fd, path)
            except OSError as exc:
                raise BpfError(f"cannot pin program {name} at {path}: {exc}") from exc

    def _unpin_programs(self) -> None:
        """Remove our program pins (not a newer agent's that replaced them)."""
        if self.pin_dir is None:
            return
        for name, _, _ in (*_POD_CGROUP_PROGRAMS, _PROXY_PROGRAM):
            path = os.path.join(self.pin_dir, "progs", name)
            try:
                fd = self._libbpf.obj_get(path)
            except OSError:
                continue
            try:
                ours = self._libbpf.prog_id_and_name(self._fns[name].fd)[0]
                if self._libbpf.prog_id_and_name(fd)[0] == ours:
                    os.unlink(path)
            except OSError as exc:
                log.warning("cannot remove the program pin %s: %s", path, exc)
            finally:
                os.close(fd)

    def _close_predecessors(self) -> None:
        for fd in self._predecessors.values():
            os.close(fd)
        self._predecessors.clear()

    def _open_pinned_map(self, path: str) -> int | None:
        """An fd of the object pinned at ``path``, or None if nothing is."""
        try:
            return self._libbpf.obj_get(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise BpfError(f"cannot open the map pinned at {path}: {exc}") from exc

    def _links_dir(self) -> str:
        if self.pin_dir is None:
            raise BpfError("pinning needs a MeshBpf made with pin_dir")
        return os.path.join(self.pin_dir, "links")

    def _link_pin_path(self, pin_key: str) -> str:
        if not _PIN_KEY.fullmatch(pin_key):
            raise BpfError(
                f"pin key must be 1-200 of A-Z a-z 0-9 _ : - (bpffs refuses '.'), got {pin_key!r}"
            )
        return os.path.join(self._links_dir(), pin_key)

    def _sk_lookup_link(self, netns_fd: int, pin_path: str | None) -> tuple[int, bool]:
        """A link running our sk_lookup on the netns, pinned if asked; and if it was adopted."""
        if pin_path is not None:
            adopted = self._adopt_link(netns_fd, pin_path)
            if adopted is not None:
                return adopted, True
        fn = self._fns[_SK_LOOKUP_PROGRAM[0]]
        try:
            link_fd = self._libbpf.link_create(fn.fd, netns_fd, _ATTACH_SK_LOOKUP)
        except OSError as exc:
            raise BpfError(
                f"linking sk_lookup to netns fd {netns_fd} failed ({exc.strerror}); "
                "pass an fd of /proc/<pid>/ns/net or /var/run/netns/<name>"
            ) from exc
        if pin_path is not None:
            try:
                self._libbpf.obj_pin(link_fd, pin_path)
            except OSError as exc:
                self._drop_link(link_fd, None)
                raise BpfError(f"pinning the sk_lookup link at {pin_path} failed: {exc}") from exc
        return link_fd, False

    def _adopt_link(self, netns_fd: int, pin_path: str) -> int | None:
        """The link pinned at ``pin_path`` for this netns, switched to our program.

        None if nothing is pinned there, or if the pin is stale (its netns was deleted,
        which leaves the link defunct with inode 0, or replaced): then the pin is removed
        so that a new link takes its place.
        """
        try:
            link_fd = self._libbpf.obj_get(pin_path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise BpfError(f"cannot open the link pinned at {pin_path}: {exc}") from exc
        try:
            info = self._libbpf.link_info(link_fd)
            wanted = (_LINK_TYPE_NETNS, _ATTACH_SK_LOOKUP, os.fstat(netns_fd).st_ino)
            if (info.type, info.attach_type, info.netns_ino) == wanted:
                self._libbpf.link_update(link_fd, self._fns[_SK_LOOKUP_PROGRAM[0]].fd)
                log.info("adopted the sk_lookup link pinned at %s (id %d)", pin_path, info.id)
                return link_fd
        except OSError as exc:
            os.close(link_fd)
            raise BpfError(
                f"cannot adopt the link pinned at {pin_path} ({exc}); unpin_pod it to start over"
            ) from exc
        log.info("replacing the stale link pinned at %s (its netns is gone)", pin_path)
        self._drop_link(link_fd, pin_path)
        return None

    def _drop_link(self, link_fd: int, pin_path: str | None) -> None:
        """Unpin a link and detach it now, even if another fd still refers to it; close it."""
        try:
            if pin_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pin_path)
            self._libbpf.link_detach(link_fd)
        except OSError as exc:
            log.warning("detaching link %s: %s", pin_path or link_fd, exc)
        finally:
            os.close(link_fd)

    def _forget_addresses(self, addresses: Iterable[str]) -> None:
        table = self._bpf[b"enrolled_pods"]
        for address in addresses:
            key = table.Key(ip4_key(address))
            if key in table:
                del table[key]
            self.remove_inbound_listener(address)

    def _cgroup_attach(self, name: str, cgroup_fd: int, attach_type: int, path: str) -> None:
        try:
            self._libbpf.prog_attach(self._fns[name].fd, cgroup_fd, attach_type, _BPF_F_ALLOW_MULTI)
        except OSError as exc:
            hint = (
                "it is already attached there (by another MeshBpf?)"
                if exc.errno == errno.EEXIST
                else "is it a cgroup v2 directory and is CONFIG_CGROUP_BPF enabled?"
            )
            raise BpfError(
                f"attaching {name} to cgroup {path} failed ({exc.strerror}); {hint}"
            ) from exc
        self._detach_stale(name, cgroup_fd, attach_type, path)

    def _detach_stale(self, name: str, cgroup_fd: int, attach_type: int, path: str) -> None:
        """Detach copies of our program left on the cgroup by an agent that died.

        Legacy attachments outlive their loader (see the module docstring), so a restarted
        agent finds its predecessor's programs still running against maps nobody can
        update. Ours is attached first, so the cgroup is never left without one.
        """
        our_id, our_name = self._libbpf.prog_id_and_name(self._fns[name].fd)
        try:
            attached = self._libbpf.prog_query(cgroup_fd, attach_type)
        except OSError as exc:
            log.warning("cannot list programs on %s to remove stale ones: %s", path, exc)
            return
        for prog_id in attached:
            if prog_id == our_id:
                continue
            try:
                if prog_id in self._predecessors:
                    fd = os.dup(self._predecessors[prog_id])
                else:
                    fd = self._libbpf.prog_fd_by_id(prog_id)
            except OSError as exc:
                if exc.errno == errno.EPERM:  # Linux 6.1 wants CAP_SYS_ADMIN for this
                    log.warning(
                        "cannot open program %d on %s to check for a stale %s (%s), nor is "
                        "it the previous agent's; that copy stays attached until the pod goes",
                        prog_id,
                        path,
                        name,
                        exc.strerror,
                    )
                continue  # else gone meanwhile
            try:
                if self._libbpf.prog_id_and_name(fd)[1] == our_name:
                    self._libbpf.prog_detach(fd, cgroup_fd, attach_type)
                    log.info("detached stale %s (id %d) from %s", name, prog_id, path)
            except OSError as exc:
                log.warning("cannot detach stale %s (id %d) from %s: %s", name, prog_id, path, exc)
            finally:
                os.close(fd)

    def _cgroup_detach(self, name: str, cgroup_fd: int, attach_type: int) -> None:
        """Best effort: a cgroup that is already gone took its programs with it."""
        try:
            self._libbpf.prog_detach(self._fns[name].fd, cgroup_fd, attach_type)
        except OSError as exc:
            log.debug("detaching %s: %s (already gone)", name, exc)


def _pod_ip_key(address: str) -> int:
    """``ip4_key`` with a BpfError for the caller."""
    try:
        return ip4_key(address)
    except ValueError as exc:
        raise BpfError(f"{exc}; only IPv4 pod addresses are captured") from exc


def _open_cgroup(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise BpfError(
            f"cannot open cgroup {path} ({exc.strerror}); pass a directory under the "
            f"cgroup v2 mount"
        ) from exc
