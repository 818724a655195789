"""ambimesh's eBPF programs (C in ``src/``) and the one module that loads them."""

from bpf.loader import (
    BpfError,
    MeshBpf,
    PodAttachment,
    ProxyAttachment,
    cgroup2_mount,
    check_environment,
    ensure_bpffs,
    purge_pins,
)

__all__ = [
    "BpfError",
    "MeshBpf",
    "PodAttachment",
    "ProxyAttachment",
    "cgroup2_mount",
    "check_environment",
    "ensure_bpffs",
    "purge_pins",
]
