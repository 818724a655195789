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

The netns ``sk_lookup`` program can only be attached as a link (``bpf_link_create``), so
it *does* die with the agent's fds and inbound capture then stops until a new agent
attaches again: pinning the link (or handing its fd to ztunnel) is the fix, out of scope
here. ``PodAttachment.link_fd`` is exposed for that.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bpf.maps import COUNTERS, ip4_key

__all__ = [
    "DEFAULT_HBONE_PORT",
    "DEFAULT_INBOUND_PORT",
    "DEFAULT_OUTBOUND_PORT",
    "BpfError",
    "MeshBpf",
    "PodAttachment",
    "ProxyAttachment",
    "cflags",
    "cgroup2_mount",
    "check_environment",
]

log = logging.getLogger(__name__)

DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
DEFAULT_HBONE_PORT = 15008

SRC_DIR = Path(__file__).resolve().parent / "src"
# Order matters: the shared header first, then one file per attach point.
SOURCE_FILES = (
    "maps.h",
    "connect4.c",
    "sockops.c",
    "getsockopt.c",
    "getpeername4.c",
    "sk_lookup.c",
)

# From include/uapi/linux/bpf.h.
_PROG_SOCK_OPS = 13
_PROG_CGROUP_SOCK_ADDR = 18
_PROG_CGROUP_SOCKOPT = 25
_PROG_SK_LOOKUP = 30
_ATTACH_CGROUP_SOCK_OPS = 3
_ATTACH_CGROUP_INET4_CONNECT = 10
_ATTACH_CGROUP_GETSOCKOPT = 21
_ATTACH_CGROUP_INET4_GETPEERNAME = 29
_ATTACH_SK_LOOKUP = 36
_BPF_F_ALLOW_MULTI = 1 << 1
_BPF_ANY = 0
_BPF_CGROUP_MAX_PROGS = 64
_PROG_INFO_SIZE = 256  # >= sizeof(struct bpf_prog_info) on this kernel; the kernel fills less

# (function, program type, expected attach type) for each program.
_POD_CGROUP_PROGRAMS = (
    ("ambimesh_connect4", _PROG_CGROUP_SOCK_ADDR, _ATTACH_CGROUP_INET4_CONNECT),
    ("ambimesh_sockops", _PROG_SOCK_OPS, _ATTACH_CGROUP_SOCK_OPS),
    ("ambimesh_getpeername4", _PROG_CGROUP_SOCK_ADDR, _ATTACH_CGROUP_INET4_GETPEERNAME),
)
_PROXY_PROGRAM = ("ambimesh_getsockopt", _PROG_CGROUP_SOCKOPT, _ATTACH_CGROUP_GETSOCKOPT)
_SK_LOOKUP_PROGRAM = ("ambimesh_sk_lookup", _PROG_SK_LOOKUP, _ATTACH_SK_LOOKUP)


class BpfError(Exception):
    """Anything that went wrong loading, attaching or updating ambimesh's eBPF programs."""


@dataclass(eq=False)
class PodAttachment:
    """One enrolled pod: programs on its cgroup, an sk_lookup link on its netns."""

    cgroup_path: str
    addresses: tuple[str, ...]
    link_fd: int
    cgroup_fd: int = field(repr=False)
    active: bool = True


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
    """The compiler flags that go with ``source()``: include path and the ports."""
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


class _Libbpf:
    """The few libbpf calls bcc's Python API lacks (links, SOCKHASH, attach errnos)."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as exc:
            raise BpfError(
                f"cannot load libbpf.so.1 ({exc}); install libbpf1 or run scripts/setup.sh"
            ) from exc
        c_int, c_void_p, c_uint, c_uint64 = (
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_uint,
            ctypes.c_uint64,
        )
        lib.bpf_link_create.argtypes = [c_int, c_int, c_int, c_void_p]
        lib.bpf_map_update_elem.argtypes = [c_int, c_void_p, c_void_p, c_uint64]
        lib.bpf_map_delete_elem.argtypes = [c_int, c_void_p]
        lib.bpf_prog_attach.argtypes = [c_int, c_int, c_int, c_uint]
        lib.bpf_prog_detach2.argtypes = [c_int, c_int, c_int]
        lib.bpf_prog_query.argtypes = [c_int, c_int, c_uint, c_void_p, c_void_p, c_void_p]
        lib.bpf_prog_get_fd_by_id.argtypes = [c_uint]
        lib.bpf_obj_get_info_by_fd.argtypes = [c_int, c_void_p, c_void_p]
        for fn in (
            "bpf_link_create",
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
        info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
        size = ctypes.c_uint32(_PROG_INFO_SIZE)
        self._check(
            self._lib.bpf_obj_get_info_by_fd(prog_fd, info, ctypes.byref(size)),
            "bpf_obj_get_info_by_fd",
        )
        prog_id = int.from_bytes(info.raw[4:8], sys.byteorder)
        name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
        return prog_id, name

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
    """

    def __init__(
        self,
        outbound_port: int = DEFAULT_OUTBOUND_PORT,
        inbound_port: int = DEFAULT_INBOUND_PORT,
        hbone_port: int = DEFAULT_HBONE_PORT,
    ) -> None:
        flags = cflags(outbound_port, inbound_port, hbone_port)
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
                "`python -m bpf --dump` prints the C that was compiled"
            ) from exc
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
        except Exception as exc:
            self._bpf.cleanup()
            raise BpfError(
                f"the kernel rejected an eBPF program ({exc}); this needs Linux >= 5.15 with "
                "CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF; `python -m bpf --dump` prints the C"
            ) from exc
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
        self, cgroup_path: str, netns_fd: int, addresses: Sequence[str]
    ) -> PodAttachment:
        """Capture a pod: connect4, sockops, getpeername4 on its cgroup; sk_lookup on its netns."""
        self._check_open()
        keys = [_pod_ip_key(address) for address in addresses]
        path = os.path.realpath(cgroup_path)
        if path in self._pods:
            raise BpfError(f"cgroup {path} is already attached; detach_pod it first")
        cgroup_fd = _open_cgroup(path)
        attached: list[tuple[str, int]] = []
        link_fd = -1
        try:
            for name, _, attach_type in _POD_CGROUP_PROGRAMS:
                self._cgroup_attach(name, cgroup_fd, attach_type, path)
                attached.append((name, attach_type))
            fn = self._fns[_SK_LOOKUP_PROGRAM[0]]
            try:
                link_fd = self._libbpf.link_create(fn.fd, netns_fd, _ATTACH_SK_LOOKUP)
            except OSError as exc:
                raise BpfError(
                    f"linking sk_lookup to netns fd {netns_fd} failed ({exc.strerror}); "
                    "pass an fd of /proc/<pid>/ns/net or /var/run/netns/<name>"
                ) from exc
            table = self._bpf[b"enrolled_pods"]
            for key in keys:
                table[table.Key(key)] = table.Leaf(1)
        except BaseException:
            if link_fd >= 0:
                os.close(link_fd)
            for name, attach_type in attached:
                self._cgroup_detach(name, cgroup_fd, attach_type)
            os.close(cgroup_fd)
            raise
        attachment = PodAttachment(path, tuple(addresses), link_fd, cgroup_fd)
        self._pods[path] = attachment
        return attachment

    def detach_pod(self, attachment: PodAttachment) -> None:
        """Undo attach_pod, including the pod's map entries; safe to call twice."""
        if not attachment.active:
            return
        attachment.active = False
        self._pods.pop(attachment.cgroup_path, None)
        os.close(attachment.link_fd)
        for name, _, attach_type in _POD_CGROUP_PROGRAMS:
            self._cgroup_detach(name, attachment.cgroup_fd, attach_type)
        os.close(attachment.cgroup_fd)
        table = self._bpf[b"enrolled_pods"]
        for address in attachment.addresses:
            key = table.Key(ip4_key(address))
            if key in table:
                del table[key]
            self.remove_inbound_listener(address)

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

    def table(self, name: str) -> Any:
        """bcc's view of a map, for inspection and tests (not for SOCKHASH)."""
        self._check_open()
        return self._bpf[name.encode()]

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Detach everything this object attached and unload the programs; idempotent."""
        if self._closed:
            return
        try:
            for pod in list(self._pods.values()):
                self.detach_pod(pod)
            for proxy in list(self._proxies.values()):
                self.detach_proxy(proxy)
        finally:
            self._closed = True
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

    def _check_open(self) -> None:
        if self._closed:
            raise BpfError("this MeshBpf is closed; create a new one")

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
                fd = self._libbpf.prog_fd_by_id(prog_id)
            except OSError:
                continue  # gone meanwhile
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
