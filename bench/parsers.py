"""Pure parsers for what the benchmark reads: load generators' output and /proc files.

Kept free of I/O so they are tested on recorded outputs (tests/unit/test_bench_parsers.py)
and a tool's format change fails there, not in the middle of a 10-minute run.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass


class ToolOutputError(ValueError):
    """A tool's output is not what the benchmark expects; the message quotes it."""


@dataclass(frozen=True)
class IperfResult:
    bits_per_second: float  # as the receiver counted them
    bytes: int
    seconds: float


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    errors: int  # connect + read + write + timeout + non-2xx/3xx

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class HostCpu:
    """Host-wide CPU time from /proc/stat, in clock ticks summed over all CPUs."""

    busy: int  # user + nice + system + irq + softirq (guest time is inside user)
    steal: int  # the hypervisor ran someone else on our vCPUs
    total: int


def _excerpt(text: str) -> str:
    return text if len(text) <= 400 else f"{text[:200]} ... {text[-200:]}"


def parse_iperf3(text: str) -> IperfResult:
    """``iperf3 -c ... -J``: the receiver's total for the whole test."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise ToolOutputError(f"iperf3 printed no JSON: {_excerpt(text)!r}") from None
    if doc.get("error"):
        raise ToolOutputError(f"iperf3 failed: {doc['error']}")
    try:
        received = doc["end"]["sum_received"]
        return IperfResult(
            bits_per_second=float(received["bits_per_second"]),
            bytes=int(received["bytes"]),
            seconds=float(received["seconds"]),
        )
    except (KeyError, TypeError, ValueError):
        raise ToolOutputError(f"iperf3 JSON has no end.sum_received: {_excerpt(text)!r}") from None


def parse_wrk(text: str) -> WrkResult:
    """The ``JSON {...}`` line that bench/lua/wrk_bench.lua's done() prints."""
    lines = [line for line in text.splitlines() if line.startswith("JSON ")]
    if len(lines) != 1:
        raise ToolOutputError(f"wrk printed {len(lines)} summary lines: {_excerpt(text)!r}")
    try:
        doc = json.loads(lines[0][len("JSON ") :])
        errors = sum(
            int(doc[k])
            for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout")
        )
        return WrkResult(
            requests=int(doc["requests"]),
            seconds=int(doc["duration_us"]) / 1e6,
            p50_us=int(doc["p50_us"]),
            p90_us=int(doc["p90_us"]),
            p99_us=int(doc["p99_us"]),
            max_us=int(doc["max_us"]),
            errors=errors,
        )
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise ToolOutputError(f"wrk summary line is malformed: {lines[0]!r}") from None


def parse_pid_stat_ticks(text: str) -> tuple[int, int]:
    """(utime, stime) in clock ticks, every thread of the process, from /proc/<pid>/stat.

    The command name (field 2) is in parentheses and may hold spaces or ')', so fields are
    counted after the last ')'.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(rest[11]), int(rest[12])


def parse_status_kib(text: str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status, e.g. VmRSS or VmHWM."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise ToolOutputError(f"no {field} in /proc/<pid>/status")


def parse_host_cpu(text: str) -> HostCpu:
    """The aggregate ``cpu`` line of /proc/stat."""
    fields = text.splitlines()[0].split()
    if fields[0] != "cpu":
        raise ToolOutputError(f"/proc/stat starts with {fields[0]!r}, not 'cpu'")
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    busy = user + nice + system + irq + softirq
    return HostCpu(busy=busy, steal=steal, total=busy + idle + iowait + steal)


def parse_cgroup_usage_usec(text: str) -> int:
    """``usage_usec`` from a cgroup v2 cpu.stat (present with or without the cpu controller)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    raise ToolOutputError("cpu.stat has no usage_usec")


@dataclass(frozen=True)
class Frame:
    name: str
    self_share: float  # of the busy samples, with this frame on top
    total_share: float  # of the busy samples, with this frame anywhere on the stack


@dataclass(frozen=True)
class LoopProfile:
    """Where an event loop's thread spends the time it is not waiting in epoll."""

    samples: int  # of the loop's thread
    busy_share: float  # of those, not waiting for events
    frames: list[Frame]  # hottest first, by self time (C functions included)
    python: list[Frame]  # by the innermost Python function, with the C code it called


_LINE_NUMBER = re.compile(r":\d+\)$")
LOOP_FRAME = "uv_run"  # libuv's loop: on the stack of every sample of uvloop's thread
IDLE_LEAVES = ("epoll_wait", "epoll_pwait")


def loop_profile(collapsed: str, limit: int = 15) -> LoopProfile:
    """Summarise a py-spy ``record --native --format raw`` profile (collapsed stacks:
    ``frame;frame;...;frame COUNT`` per line) of a uvloop process.

    Other threads (gRPC push client, metrics server) are left out, and so are the loop's
    samples waiting in epoll. A frame is ``function (file:line)``; the lines of one function
    are counted together.
    """
    own: Counter[str] = Counter()
    own_python: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    samples = busy = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
        if not any(frame.startswith(LOOP_FRAME + " ") for frame in frames):
            continue
        count = int(count_text)
        samples += count
        if frames[-1].startswith(IDLE_LEAVES):
            continue
        busy += count
        own[frames[-1]] += count
        python = [frame for frame in frames if frame.endswith(".py)")]
        own_python[python[-1] if python else "(no Python frame)"] += count
        for name in set(frames):
            anywhere[name] += count

    def top(counts: Counter[str]) -> list[Frame]:
        return [
            Frame(name, n / busy, anywhere[name] / busy) for name, n in counts.most_common(limit)
        ]

    return LoopProfile(samples, busy / samples if samples else 0.0, top(own), top(own_python))


_TCP_LISTEN = "0A"


def listening_ports(proc_net_tcp: str) -> set[int]:
    """Local ports in LISTEN state in a /proc/<pid>/net/tcp table (that pid's netns)."""
    ports = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == _TCP_LISTEN:
            ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports
