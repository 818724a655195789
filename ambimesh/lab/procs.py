"""Starting processes the way a node would: in a cgroup, inside a network namespace.

Pods' processes go through ``ip netns exec`` so they see the pod's /etc/netns hosts file
like a container sees its own; the mesh's processes enter the node namespace directly and
keep the host's /proc and cgroup mounts, which the agent needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from pyroute2 import netns


def _env() -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _preexec(cgroup: Path, netns_fd: int | None) -> Callable[[], None]:
    procs = str(cgroup / "cgroup.procs")

    def enter() -> None:
        with open(procs, "w") as f:
            f.write("0")
        if netns_fd is not None:
            netns.setns(netns_fd)

    return enter


def spawn(
    argv: Sequence[str],
    *,
    cgroup: Path,
    netns_name: str,
    pod: bool,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    capture: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the cgroup and netns; as a pod process when ``pod`` is true.

    Output goes to ``log`` (a daemon in its own session), to pipes (``capture``), or to
    the caller's terminal.
    """
    full_env = {**_env(), **(env or {})}
    out: int | IO[bytes] | None = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115 - handed to the child, closed below
    fd = None if pod else os.open(f"/var/run/netns/{netns_name}", os.O_RDONLY)
    try:
        command = ["ip", "netns", "exec", netns_name, *argv] if pod else list(argv)
        return subprocess.Popen(
            command,
            preexec_fn=_preexec(cgroup, fd),
            stdin=stdin,
            stdout=subprocess.PIPE if capture else out,
            stderr=subprocess.PIPE if capture else subprocess.STDOUT if out is not None else None,
            env=full_env,
            start_new_session=log is not None,
        )
    finally:
        if fd is not None:
            os.close(fd)
        if out is not None and not isinstance(out, int):
            out.close()
