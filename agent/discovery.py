"""Finding a pod's network namespace and cgroup the way a Kubernetes node agent does:
through the processes whose cgroup path carries the pod's UID."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mesh.cgroups import cgroup2_mount, parse_cgroup_v2

# cgroupfs driver: .../pod<uid>/...; systemd driver: ...-pod<uid_with_underscores>.slice/...
_POD_SEGMENT = re.compile(r"pod([0-9a-fA-F_-]{32,36})(?:\.slice)?$")


@dataclass(frozen=True)
class PodSandbox:
    pid: int
    netns_path: str
    cgroup_path: Path


def pod_cgroup_root(path: str, uid: str) -> str | None:
    """The pod-level cgroup in ``path`` (containers may sit in child cgroups below it)."""
    parts = path.strip("/").split("/")
    for i, segment in enumerate(parts):
        match = _POD_SEGMENT.search(segment)
        if match and match.group(1).replace("_", "-").lower() == uid.lower():
            return "/" + "/".join(parts[: i + 1])
    return None


def find_pod(uid: str, proc: Path = Path("/proc")) -> PodSandbox | None:
    """The first live process of pod ``uid``, or None if it has none (yet)."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cgroup = parse_cgroup_v2((entry / "cgroup").read_text())
        except OSError:
            continue
        if cgroup is None:
            continue
        root = pod_cgroup_root(cgroup, uid)
        if root is None:
            continue
        netns = str(entry / "ns" / "net")
        if not os.path.exists(netns):
            continue
        return PodSandbox(int(entry.name), netns, cgroup2_mount() / root.lstrip("/"))
    return None
