"""CPU and memory of the proxies under test, and how busy the rest of the machine was.

A proxy's CPU is utime + stime of its process (every thread) read before and after a run;
its peak memory is VmHWM, reset right before the run (``clear_refs`` 5), so the peak is the
one of that run. Other processes on a shared machine steal CPU from the run: the CPU the
host spent outside the lab's cgroup tree, plus hypervisor steal, is recorded beside every
run so a noisy number can be recognised as such.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.parsers import (
    HostCpu,
    parse_cgroup_usage_usec,
    parse_host_cpu,
    parse_pid_stat_ticks,
    parse_status_kib,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Proxy:
    """One tunnel: ``side`` is "client" (sends HBONE) or "server" (terminates it); ``pid``
    its process, ``others`` the rest of a multi-process one (ztunnel ``--workers N``)."""

    side: str
    pid: int
    others: tuple[int, ...] = ()

    @property
    def pids(self) -> tuple[int, ...]:
        return (self.pid, *self.others)

    def cpu_seconds(self) -> tuple[float, float]:
        """(user, system) CPU seconds so far, all processes together."""
        user = system = 0
        for pid in self.pids:
            u, s = parse_pid_stat_ticks(Path(f"/proc/{pid}/stat").read_text())
            user, system = user + u, system + s
        return user / CLOCK_TICKS, system / CLOCK_TICKS

    def rss_mib(self) -> float:
        """VmRSS; for several processes their PSS summed (forked workers share most pages,
        which VmRSS would count once per process)."""
        if not self.others:
            return _status_kib(self.pid, "VmRSS") / 1024
        return sum(_pss_kib(pid) for pid in self.pids) / 1024

    def peak_mib(self) -> float:
        """VmHWM; for several processes each one's PSS plus its growth to its peak."""
        if not self.others:
            return _status_kib(self.pid, "VmHWM") / 1024
        return (
            sum(
                _pss_kib(pid) + _status_kib(pid, "VmHWM") - _status_kib(pid, "VmRSS")
                for pid in self.pids
            )
            / 1024
        )

    def reset_peak(self) -> None:
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def _status_kib(pid: int, field: str) -> int:
    return parse_status_kib(Path(f"/proc/{pid}/status").read_text(), field)


def _pss_kib(pid: int) -> int:
    return parse_status_kib(Path(f"/proc/{pid}/smaps_rollup").read_text(), "Pss")


@dataclass(frozen=True)
class ProxyUsage:
    cpu_seconds: float  # user + system
    system_seconds: float  # the kernel's share: syscalls, and softirq work done meanwhile
    peak_mib: float


@dataclass(frozen=True)
class Noise:
    """What else ran during a run, in % of one CPU (a 2-vCPU machine has 200)."""

    foreign_pct: float  # host busy time outside the lab's cgroups
    steal_pct: float


class RunMeter:
    """Brackets one run: ``start()`` before, ``stop()`` after."""

    def __init__(self, proxies: tuple[Proxy, ...], lab_cgroup: Path) -> None:
        self._proxies = proxies
        self._lab_cpu_stat = lab_cgroup / "cpu.stat"
        self._cpu0: dict[int, tuple[float, float]] = {}
        self._host0 = HostCpu(0, 0, 0)
        self._lab0 = 0

    def start(self) -> None:
        for proxy in self._proxies:
            proxy.reset_peak()
        self._cpu0 = {p.pid: p.cpu_seconds() for p in self._proxies}
        self._host0 = _host_cpu()
        self._lab0 = parse_cgroup_usage_usec(self._lab_cpu_stat.read_text())

    def stop(self) -> tuple[dict[str, ProxyUsage], Noise]:
        usage = {}
        for p in self._proxies:
            (user, system), (user0, system0) = p.cpu_seconds(), self._cpu0[p.pid]
            usage[p.side] = ProxyUsage(
                user + system - user0 - system0, system - system0, p.peak_mib()
            )
        host = _host_cpu()
        lab_usec = parse_cgroup_usage_usec(self._lab_cpu_stat.read_text()) - self._lab0
        total = host.total - self._host0.total
        if total <= 0:
            return usage, Noise(0.0, 0.0)
        cpus = os.cpu_count() or 1
        wall = total / CLOCK_TICKS / cpus  # seconds of wall time the ticks cover
        busy = (host.busy - self._host0.busy) / CLOCK_TICKS
        foreign = max(0.0, busy - lab_usec / 1e6)
        steal = (host.steal - self._host0.steal) / CLOCK_TICKS
        return usage, Noise(100 * foreign / wall, 100 * steal / wall)


def _host_cpu() -> HostCpu:
    return parse_host_cpu(Path("/proc/stat").read_text())
