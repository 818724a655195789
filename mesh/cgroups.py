"""cgroup v2 paths: where the hierarchy is mounted and which cgroup a process is in."""

from __future__ import annotations

from functools import cache
from pathlib import Path


class CgroupError(RuntimeError):
    """cgroup v2 is missing or a process's cgroup cannot be read."""


@cache
def cgroup2_mount() -> Path:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise CgroupError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")


def parse_cgroup_v2(text: str) -> str | None:
    """The v2 path from a /proc/<pid>/cgroup text (the "0::/path" line), if any."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def cgroup_of(pid: int | str) -> Path:
    path = parse_cgroup_v2(Path(f"/proc/{pid}/cgroup").read_text())
    if path is None:
        raise CgroupError(f"process {pid} is in no cgroup v2 (no 0:: line in /proc/{pid}/cgroup)")
    return cgroup2_mount() / path.lstrip("/")


def cgroup_populated(path: str | Path) -> bool:
    """Whether any process lives in the cgroup or below it (False once it is gone)."""
    try:
        return "populated 1" in (Path(path) / "cgroup.events").read_text()
    except OSError:
        return False
