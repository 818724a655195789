"""Gate for tests that need root, cgroup v2 and BPF.

They skip on a developer laptop, but with ``AMBIMESH_REQUIRE_PRIVILEGED=1`` (CI) a missing
capability is a failure that names it, so a misconfigured runner cannot pass by skipping.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import pytest

from bpf.loader import BpfError, cgroup2_mount


def missing_capability() -> str | None:
    """What this process lacks for privileged tests, or None."""
    if os.geteuid() != 0:
        return "root (euid 0) is needed for eBPF, cgroups and network namespaces"
    try:
        cgroup2_mount()
    except BpfError as exc:
        return str(exc)
    if importlib.util.find_spec("bcc") is None:
        return "bcc is not importable; install python3-bpfcc and run scripts/setup.sh"
    try:
        ctypes.CDLL("libbpf.so.1")
    except OSError:
        return "libbpf.so.1 is missing; install libbpf1 (scripts/setup.sh)"
    if not os.path.exists("/proc/sys/net/core/bpf_jit_enable"):
        return "this kernel has no BPF support (CONFIG_BPF_SYSCALL)"
    return None


def require_privileged() -> None:
    """Skip (or, with AMBIMESH_REQUIRE_PRIVILEGED=1, fail) unless privileged tests can run."""
    missing = missing_capability()
    if missing is None:
        return
    if os.environ.get("AMBIMESH_REQUIRE_PRIVILEGED") == "1":
        pytest.fail(f"AMBIMESH_REQUIRE_PRIVILEGED=1 but: {missing}", pytrace=False)
    pytest.skip(f"privileged test: {missing}")
