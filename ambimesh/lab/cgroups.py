"""The lab's cgroups: one tree per lab, so one write to cgroup.kill stops everything."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from mesh.cgroups import cgroup2_mount


def lab_root(lab: str) -> Path:
    return cgroup2_mount() / lab


def pod_cgroup(lab: str, node: str, uid: str) -> Path:
    """Laid out like the kubelet's cgroupfs driver: .../kubepods/pod<uid>."""
    return lab_root(lab) / node / "kubepods" / f"pod{uid}"


def component_cgroup(lab: str, node: str | None, component: str) -> Path:
    return lab_root(lab) / (node or "control-plane") / component


def create(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def pids(cgroup: Path) -> list[int]:
    """The processes directly in ``cgroup`` (none if it does not exist)."""
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill(cgroup: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process in ``cgroup`` and below (cgroup v2's cgroup.kill, Linux 5.14+)
    and wait until they are gone."""
    if not cgroup.is_dir():
        return
    (cgroup / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + timeout
    while "populated 1" in (cgroup / "cgroup.events").read_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in {cgroup} survived SIGKILL for {timeout}s")
        time.sleep(0.05)


def remove_tree(root: Path, timeout: float = 10.0) -> None:
    """Kill every process under ``root`` and remove the cgroups, deepest first."""
    if not root.is_dir():
        return
    kill(root)
    deadline = time.monotonic() + timeout
    dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for cg in [*dirs, root]:
        while True:
            try:
                cg.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"cgroup {cg} still has processes after {timeout}s"
                    ) from None
                time.sleep(0.05)
