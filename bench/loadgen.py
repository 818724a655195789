"""The load generators (Debian's iperf3 and wrk), run as processes of a lab pod.

Why these: iperf3 is the usual single-stream bulk meter and prints JSON; wrk is the
fastest HTTP/1.1 client in Debian (one thread drives ~80k req/s here, so it is never the
bottleneck of a tunnel) and its Lua hooks give both a machine-readable summary and a fixed
offered rate (bench/lua/wrk_bench.lua). For latency at a fixed rate the alternatives were
worse: ``hey -q`` has 0.1 ms resolution and adds ~0.4 ms of its own at p50, which hides the
proxies' cost; ``h2load --rate`` speaks only HTTP/2 to the app; an asyncio client of our own
would put a Python event loop (slower than the thing measured) on the client side.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ambimesh.lab.lab import Lab
from bench.parsers import IperfResult, ToolOutputError, WrkResult, parse_iperf3, parse_wrk

WRK_SCRIPT = Path(__file__).parent / "lua" / "wrk_bench.lua"
GRACE_SECONDS = 30.0  # beyond a run's own duration before it is killed


def iperf3_argv(host: str, port: int, seconds: int) -> list[str]:
    """One TCP stream, client sends, JSON report."""
    return ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"]


def wrk_argv(
    url: str,
    seconds: int,
    connections: int,
    threads: int,
    close: bool = False,
    rate: int | None = None,
) -> list[str]:
    """Unpaced (max req/s) unless ``rate``; ``close`` sends ``Connection: close`` so every
    request is a new TCP connection (wrk reconnects when the server closes)."""
    argv = ["wrk", "-c", str(connections), "-t", str(threads), "-d", f"{seconds}s"]
    argv += ["-s", str(WRK_SCRIPT)]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    if rate is not None:
        argv += ["--", str(rate), str(threads)]
    return argv


def run_in_pod(lab: Lab, pod: str, argv: list[str], seconds: float) -> str:
    """Run a tool as a process of ``pod`` (its netns and cgroup, so an enrolled pod's
    connections are captured like any app's); its stdout."""
    done = lab.run(pod, argv, timeout=seconds + GRACE_SECONDS)
    if done.returncode != 0 and not done.stdout.strip():
        raise ToolOutputError(
            f"{argv[0]} in {pod} exited {done.returncode}: {done.stderr.strip()[-500:]}"
        )
    return done.stdout


def iperf3(
    lab: Lab, pod: str, host: str, port: int, seconds: int, attempts: int = 2
) -> IperfResult:
    """A failed attempt is retried: iperf3's own teardown through a tunnel is sometimes
    reset (seen with Envoy too, shared/peers/envoy-hbone/README.md pitfall 6)."""
    argv = iperf3_argv(host, port, seconds)
    for _ in range(attempts - 1):
        with contextlib.suppress(ToolOutputError):
            return parse_iperf3(run_in_pod(lab, pod, argv, seconds))
    return parse_iperf3(run_in_pod(lab, pod, argv, seconds))


def wrk(lab: Lab, pod: str, argv: list[str], seconds: int) -> WrkResult:
    return parse_wrk(run_in_pod(lab, pod, argv, seconds))
