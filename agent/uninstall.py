"""Remove everything ambimesh's node components left on a node (``ambimesh uninstall``).

An agent that stops leaves capture in force on purpose (pinned maps and links, legacy
cgroup attachments: see bpf/loader.py), so taking ambimesh off a node is its own step:

1. refuse while an agent or ztunnel of this node still runs: the agent would attach
   again, and ztunnel's listeners live as long as its process;
2. detach every ``ambimesh_*`` program from every cgroup under the cgroup root;
3. detach and unpin every ``sk_lookup`` link pinned under the pin dir, then remove the
   pin dir (its maps go once no program uses them);
4. remove the agent's socket and lock files, and their directory if it is then empty.

Each step finds what is there now, so a second run finds nothing and succeeds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bpf.loader import DEFAULT_PIN_DIR, cgroup2_mount, purge_pins
from bpf.sweep import cgroup_programs, detach, detach_pinned_link

DEFAULT_SOCKET = "/var/run/ambimesh/ztunnel.sock"
LOCK_NAME = "agent.lock"  # the DaemonSet's `flock` file beside the socket


class UninstallError(RuntimeError):
    """Uninstalling cannot go on; the message says what to do first."""


@dataclass
class Report:
    """What was removed, one line per kernel object or file."""

    removed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.removed:
            return "nothing of ambimesh was left on this node"
        return "\n".join(f"removed {line}" for line in self.removed)


@dataclass(frozen=True)
class Running:
    pid: int
    argv: tuple[str, ...]


def _flag(argv: Sequence[str], name: str, default: str | None) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return default


def _component(argv: Sequence[str]) -> str | None:
    """'agent' or 'ztunnel' for an ambimesh node process (entry point or python -m)."""
    for i, arg in enumerate(argv[:3]):
        base = os.path.basename(arg)
        if base in ("ambimesh-agent", "ambimesh-ztunnel"):
            return base.removeprefix("ambimesh-")
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1] in ("agent", "ztunnel"):
            return argv[i + 1]
    return None


def _processes(proc: Path) -> Iterator[Running]:
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # exited meanwhile
        argv = tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)
        if argv:
            yield Running(int(entry.name), argv)


def running_components(pin_dir: str, socket_path: str, proc: Path = Path("/proc")) -> list[Running]:
    """Agents using ``pin_dir`` and ztunnels talking to ``socket_path`` on this host.

    Others (another lab's, another pin dir's) are not this uninstall's business.
    """
    found = []
    for process in _processes(proc):
        component = _component(process.argv)
        if component == "agent":
            pins = _flag(process.argv, "--bpf-pin-dir", DEFAULT_PIN_DIR)
            if pins is not None and os.path.abspath(pins) == os.path.abspath(pin_dir):
                found.append(process)
        elif component == "ztunnel":
            sock = _flag(process.argv, "--agent-socket", None)
            if sock is not None and os.path.abspath(sock) == os.path.abspath(socket_path):
                found.append(process)
    return found


def _cgroups(root: str) -> Iterator[str]:
    yield root
    for parent, dirs, _ in os.walk(root):
        for name in dirs:
            yield os.path.join(parent, name)


def uninstall(
    pin_dir: str = DEFAULT_PIN_DIR,
    cgroup_root: str | None = None,
    socket_path: str = DEFAULT_SOCKET,
) -> Report:
    """Remove ambimesh from this node (see the module docstring); safe to run again."""
    live = running_components(pin_dir, socket_path)
    if live:
        listed = "; ".join(f"pid {p.pid}: {' '.join(p.argv)[:120]}" for p in live)
        raise UninstallError(
            f"ambimesh is still running on this node ({listed}). Stop it first "
            "(systemctl disable --now ambimesh-agent ambimesh-ztunnel, or delete the "
            "DaemonSet), then run uninstall again"
        )
    report = Report()
    for cgroup in _cgroups(cgroup_root or cgroup2_mount()):
        for program in cgroup_programs(cgroup):
            if detach(program):
                report.removed.append(f"program {program.name} from cgroup {cgroup}")
    links = os.path.join(pin_dir, "links")
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(links)):
            detach_pinned_link(os.path.join(links, name))
            report.removed.append(f"sk_lookup link pinned at {links}/{name}")
    if os.path.lexists(pin_dir):
        purge_pins(pin_dir)
        report.removed.append(f"pin dir {pin_dir} (its maps)")
    run_dir = os.path.dirname(socket_path)
    for path in (socket_path, os.path.join(run_dir, LOCK_NAME)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            report.removed.append(path)
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(run_dir)  # only if empty: never someone else's files
        report.removed.append(f"directory {run_dir}")
    return report
