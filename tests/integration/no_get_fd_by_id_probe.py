"""Child process of test_bpf_restart_by_path.py: an agent restart as Linux 6.1 allows it.

A seccomp filter makes ``bpf(BPF_{PROG,MAP,LINK}_GET_FD_BY_ID)`` fail with EPERM, as 6.1
does for a loader without CAP_SYS_ADMIN (later kernels accept CAP_BPF, so this machine's
kernel alone cannot show it). Then: a MeshBpf with a pin dir captures a pod and is
released, a second one takes over. Prints JSON: each step's error (or null), the
program ids attached to the cgroup per attach type, and the second loader's own ids.

``CGROUP NETNS PIN_DIR``
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import socket
import sys
from typing import Any

from bpf.loader import _POD_CGROUP_PROGRAMS, _PROXY_PROGRAM, MeshBpf, _Libbpf

ADDRESS = "198.18.78.2"
_NR_BPF = {"x86_64": 321, "aarch64": 280}
_GET_FD_BY_ID = (13, 14, 30)  # BPF_PROG_, BPF_MAP_, BPF_LINK_GET_FD_BY_ID
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def refuse_get_fd_by_id() -> None:
    """Install the seccomp filter (irreversible for this process)."""
    machine = platform.machine()
    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    allow, eperm = 0x7FFF0000, 0x00050000 | 1  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO|EPERM
    # seccomp_data: nr at 0, arch at 4, args[0] (low half, little-endian) at 16.
    insns = [
        (ld_abs, 0, 0, 4),
        (jeq, 0, 6, _AUDIT_ARCH[machine]),  # other ABI: allow
        (ld_abs, 0, 0, 0),
        (jeq, 0, 4, _NR_BPF[machine]),  # not bpf(): allow
        (ld_abs, 0, 0, 16),
        (jeq, 3, 0, _GET_FD_BY_ID[0]),
        (jeq, 2, 0, _GET_FD_BY_ID[1]),
        (jeq, 1, 0, _GET_FD_BY_ID[2]),
        (ret, 0, 0, allow),
        (ret, 0, 0, eperm),
    ]
    program = (_SockFilter * len(insns))(*[_SockFilter(*insn) for insn in insns])
    fprog = _SockFprog(len(insns), program)
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


class _Failed(Exception):
    """A step failed; its error is in the results."""


def _step(results: dict[str, Any], name: str, call: Any) -> Any:
    try:
        value = call()
    except Exception as exc:
        results[name] = f"{type(exc).__name__}: {exc}"[:300]
        raise _Failed from exc
    results[name] = None
    return value


def main(cgroup: str, netns: str, pin_dir: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with contextlib.suppress(_Failed):
        _run(results, cgroup, netns, pin_dir)
    return results


def _run(results: dict[str, Any], cgroup: str, netns: str, pin_dir: str) -> None:
    refuse_get_fd_by_id()
    libbpf = _Libbpf()
    results["get_fd_by_id refused"] = False
    try:
        os.close(libbpf.prog_fd_by_id(1))
    except OSError as exc:
        results["get_fd_by_id refused"] = exc.errno == 1
    listener = socket.create_server(("127.0.0.1", 0))
    netns_fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        first = _step(results, "first load", lambda: MeshBpf(pin_dir=pin_dir))
        _step(
            results,
            "first listener",
            lambda: first.set_inbound_listener(ADDRESS, listener.fileno()),
        )
        _step(results, "first attach", lambda: first.attach_pod(cgroup, netns_fd, [ADDRESS], "pod"))
        _step(results, "first proxy", lambda: first.attach_proxy(cgroup))
        first.release()
        second = _step(results, "second load", lambda: MeshBpf(pin_dir=pin_dir))
        try:
            table = second.table("enrolled_pods")
            results["second sees the first's map entry"] = len(list(table.keys())) == 1
            _step(
                results,
                "second attach",
                lambda: second.attach_pod(cgroup, netns_fd, [ADDRESS], "pod"),
            )
            _step(results, "second proxy", lambda: second.attach_proxy(cgroup))
            results["ours"] = sorted(
                libbpf.prog_id_and_name(second._fns[name].fd)[0]
                for name, _, _ in (*_POD_CGROUP_PROGRAMS, _PROXY_PROGRAM)
            )
            cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                results["attached"] = sorted(
                    prog_id
                    for _, _, attach_type in (*_POD_CGROUP_PROGRAMS, _PROXY_PROGRAM)
                    for prog_id in libbpf.prog_query(cgroup_fd, attach_type)
                )
            finally:
                os.close(cgroup_fd)
        finally:
            second.close()
    finally:
        os.close(netns_fd)
        listener.close()


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
