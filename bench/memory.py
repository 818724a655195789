"""``python -m bench.memory``: ztunnel's memory idle, with many pods, with many open connections.

Issue 7's memory target: idle <= Envoy's idle RSS for the whole ztunnel, and <= 10 KiB
more per open connection, with 100 enrolled pods and 1000 open connections. Three steps,
both nodes' ztunnels measured at each, in one run (lab ``ammem``):

1. ``default``: the bench's lab (bench/testbed.py: the bundled lab plus the Envoy HBONE
   pair), ztunnels and Envoys idle: started, ready, no traffic yet.
2. ``pods``: the bundled lab plus ``--pods`` enrolled pods (``lab up --scale-pods``),
   idle.
3. ``connections``: ``--connections`` idle connections held open from ``--clients``
   pods on node-1 to echo servers in ``--servers`` pods on node-2, every client to every
   server (so node-1's ztunnel holds them outbound, node-2's inbound, over clients x
   servers HBONE connections).

A ztunnel's memory is its VmRSS, or with ``--workers`` > 1 the PSS summed over its
processes (as bench's other modes). ``--profile`` starts the lab's processes with
tracemalloc on and keeps each step's ztunnel ``/debug/memory`` (the lines holding the most
Python memory), printing what grew with the connections; tracing adds its own memory, so a
profiled run's MiB are not the figures to compare. Results go to
bench/results/memory-<time>.json; the lab, and every process started for it, is removed at
the end, also after an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ambimesh.lab import cgroups
from ambimesh.lab.lab import Lab, LabError
from ambimesh.lab.netclient import http_get
from ambimesh.lab.topology import SCALE_NAMESPACE, LabPlan, PodPlan
from bench.parsers import parse_status_kib
from bench.runner import machine_facts, stop_on_signals
from bench.testbed import Testbed

LAB_NAME = "ammem"
ECHO_PORT = 7000
NODES = ("node-1", "node-2")
SETTLE_SECONDS = 5.0  # after readiness or the last connection: certificates, GC, buffers
START_TIMEOUT = 120.0
RESULTS = Path(__file__).parent / "results"
ADMIN_PORT = 15000  # ztunnel's admin view, on the node's loopback


@dataclass(frozen=True)
class Memory:
    """One node's ztunnel, all its processes together."""

    processes: int
    rss_mib: float  # VmRSS summed (counts pages shared between processes once per process)
    pss_mib: float
    anon_mib: float  # of the PSS: the heap (Python objects, malloc) ...
    file_mib: float  # ... and mapped files (shared libraries)

    @property
    def mib(self) -> float:
        """What bench reports: RSS for one process, PSS for several."""
        return self.rss_mib if self.processes == 1 else self.pss_mib


def read_memory(pids: list[int]) -> Memory:
    def kib(path: str, name: str) -> float:
        return sum(parse_status_kib(Path(f"/proc/{p}/{path}").read_text(), name) for p in pids)

    return Memory(
        len(pids),
        kib("status", "VmRSS") / 1024,
        kib("smaps_rollup", "Pss") / 1024,
        kib("smaps_rollup", "Pss_Anon") / 1024,
        kib("smaps_rollup", "Pss_File") / 1024,
    )


def ztunnels(lab: Lab) -> dict[str, Memory]:
    return {
        node: read_memory(cgroups.pids(cgroups.component_cgroup(lab.name, node, "ztunnel")))
        for node in NODES
    }


Profiles = dict[str, dict[str, object]]


def heap_reports(lab: Lab, profiles: Profiles | None, step: str) -> None:
    """Each node's ztunnel ``/debug/memory`` into ``profiles[step]`` (when profiling)."""
    if profiles is None:
        return
    plan = lab.load_plan()
    profiles[step] = {}
    for node in NODES:
        # A tracemalloc snapshot of a busy heap takes seconds.
        netns = plan.node(node).netns
        status, body = http_get(netns, "127.0.0.1", ADMIN_PORT, "/debug/memory", timeout=60)
        if status != 200:
            raise LabError(f"ztunnel on {node}: /debug/memory answered {status}")
        profiles[step][node] = json.loads(body)


def growth(before: object, after: object, limit: int = 15) -> list[tuple[str, float]]:
    """The source lines whose traced KiB grew most from one ``/debug/memory`` to the next."""

    def lines(report: object) -> dict[str, float]:
        traced = report.get("tracemalloc") if isinstance(report, dict) else None
        if not isinstance(traced, dict):
            return {}
        return {line["where"]: line["kib"] for line in traced["top_lines"]}

    old, new = lines(before), lines(after)
    grown = [(where, kib - old.get(where, 0.0)) for where, kib in new.items()]
    return sorted(grown, key=lambda item: -item[1])[:limit]


@dataclass(frozen=True)
class Holders:
    """Which client pod opens how many connections to which servers."""

    clients: tuple[PodPlan, ...]
    servers: tuple[PodPlan, ...]
    per_client: tuple[int, ...]


def plan_connections(plan: LabPlan, connections: int, clients: int, servers: int) -> Holders:
    """Scale pods on node-1 call scale pods on node-2; ``connections`` split evenly over
    the clients (the first ones take the remainder), each dealing its share round-robin
    over every server."""
    pods = [p for p in plan.pods if p.namespace == SCALE_NAMESPACE]
    on = {node: [p for p in pods if p.node == node] for node in NODES}
    if len(on[NODES[0]]) < clients or len(on[NODES[1]]) < servers or clients < 1 or servers < 1:
        raise LabError(
            f"need {clients} client pods on {NODES[0]} and {servers} server pods on "
            f"{NODES[1]}; the lab has {len(on[NODES[0]])} and {len(on[NODES[1]])}"
        )
    share, extra = divmod(connections, clients)
    return Holders(
        tuple(on[NODES[0]][:clients]),
        tuple(on[NODES[1]][:servers]),
        tuple(share + (i < extra) for i in range(clients)),
    )


def per_connection_kib(before: Memory, after: Memory, connections: int) -> float:
    return (after.mib - before.mib) * 1024 / connections if connections else 0.0


def _await_line(proc: subprocess.Popen[bytes], prefix: str, timeout: float, what: str) -> str:
    """The first stdout line of ``proc`` starting with ``prefix``."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            break
        line = proc.stdout.readline().decode(errors="replace")
        if line.startswith(prefix):
            return line.strip()
        if not line:  # EOF: it exited
            break
    err = proc.stderr.read().decode(errors="replace")[-1000:] if proc.stderr else ""
    proc.kill()
    raise LabError(f"{what}: no {prefix!r} within {timeout:.0f}s (exit {proc.poll()}): {err}")


def open_connections(lab: Lab, holders: Holders, procs: list[subprocess.Popen[bytes]]) -> None:
    """Echo servers, then the holders, each added to ``procs`` as it starts (so the caller
    stops them whatever happens); returns once every connection echoed."""
    python = [sys.executable, "-m", "bench.holder"]
    for pod in holders.servers:
        procs.append(lab.spawn_in_pod(pod.ref, [*python, "serve", str(ECHO_PORT)], capture=True))
        _await_line(procs[-1], "listening", START_TIMEOUT, f"echo server in {pod.ref}")
    targets = [f"{pod.address}:{ECHO_PORT}" for pod in holders.servers]
    for pod, count in zip(holders.clients, holders.per_client, strict=True):
        argv = [*python, "hold", str(count), *targets]
        procs.append(lab.spawn_in_pod(pod.ref, argv, capture=True, stdin=subprocess.PIPE))
    for pod, proc in zip(holders.clients, procs[len(holders.servers) :], strict=True):
        _await_line(proc, "open", START_TIMEOUT, f"connections from {pod.ref}")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def measure_default(
    lab: Lab, profiles: Profiles | None
) -> tuple[dict[str, Memory], dict[str, float]]:
    """Step 1: the bench's lab idle; ztunnels and the Envoy pair's RSS."""
    bed = Testbed(lab)
    try:
        with tempfile.TemporaryDirectory(prefix="ammem-") as config_dir:
            variants = bed.up(Path(config_dir))
        time.sleep(SETTLE_SECONDS)
        envoy = next(v for v in variants if v.name == "envoy")
        memory = ztunnels(lab)
        heap_reports(lab, profiles, "default")
        return memory, {p.side: p.rss_mib() for p in envoy.proxies}
    finally:
        bed.down()


def measure_scaled(
    lab: Lab, args: argparse.Namespace, profiles: Profiles | None
) -> tuple[LabPlan, dict[str, Memory], dict[str, Memory]]:
    """Steps 2 and 3 on one lab."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        plan = lab.up(timeout=START_TIMEOUT, scale_pods=args.pods)
        time.sleep(SETTLE_SECONDS)
        idle = ztunnels(lab)
        heap_reports(lab, profiles, "pods")
        holders = plan_connections(plan, args.connections, args.clients, args.servers)
        open_connections(lab, holders, procs)
        time.sleep(SETTLE_SECONDS)
        loaded = ztunnels(lab)
        heap_reports(lab, profiles, "connections")
        return plan, idle, loaded
    finally:
        stop(procs)
        lab.down()


def table(
    steps: dict[str, dict[str, Memory]],
    per_connection: dict[str, float],
    envoy: dict[str, float],
    pods: int,
    connections: int,
) -> str:
    labels = {
        "default": "default lab, idle",
        "pods": f"+ {pods} enrolled pods, idle",
        "connections": f"+ {connections} open connections (node-1 out, node-2 in)",
    }
    width = 58
    lines = [f"{'ztunnel memory, MiB (RSS; PSS when several processes)':<{width}}"]
    lines[0] += "".join(f"{n:>9}" for n in NODES)
    for step, label in labels.items():
        lines.append(f"{label:<{width}}" + "".join(f"{steps[step][n].mib:>9.1f}" for n in NODES))
    lines.append(
        f"{'KiB per open connection':<{width}}"
        + "".join(f"{per_connection[n]:>9.1f}" for n in NODES)
    )
    lines.append(
        f"{'Envoy idle RSS, MiB (client side, server side)':<{width}}"
        f"{envoy['client']:>9.1f}{envoy['server']:>9.1f}"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=100, help="enrolled scale pods (default 100)")
    p.add_argument("--connections", type=int, default=1000, help="open connections (1000)")
    p.add_argument("--clients", type=int, default=10, help="client pods on node-1 (10)")
    p.add_argument("--servers", type=int, default=10, help="echo server pods on node-2 (10)")
    p.add_argument("--workers", type=int, default=1, help="ztunnel --workers (default 1)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="tracemalloc in the lab's processes; keep and summarize ztunnel's /debug/memory",
    )
    p.add_argument("--lab", default=LAB_NAME, help=f"lab name (default {LAB_NAME})")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    lab = Lab(args.lab, ztunnel_workers=args.workers)
    facts = machine_facts()
    profiles: Profiles | None = None
    if args.profile:
        profiles = {}
        os.environ["PYTHONTRACEMALLOC"] = "1"  # inherited by every process the lab starts
    default, envoy = measure_default(lab, profiles)
    plan, idle, loaded = measure_scaled(lab, args, profiles)

    steps = {"default": default, "pods": idle, "connections": loaded}
    per = {n: per_connection_kib(idle[n], loaded[n], args.connections) for n in NODES}
    result = {
        "started": stamp,
        "settings": vars(args) | {"out": str(args.out)},
        "machine": facts,
        "enrolled_pods": {
            n: sum(p.node == n and p.namespace != "legacy" for p in plan.pods) for n in NODES
        },
        "steps": {
            step: {n: dataclasses.asdict(m) | {"mib": m.mib} for n, m in memory.items()}
            for step, memory in steps.items()
        },
        "per_connection_kib": per,
        "envoy_idle_rss_mib": envoy,
        "profiles": profiles or {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print()
    print(table(steps, per, envoy, args.pods, args.connections))
    if profiles:
        for node in NODES:
            print(f"\n{node} ztunnel: traced KiB grown with the connections, by line")
            for where, kib in growth(profiles["pods"][node], profiles["connections"][node]):
                print(f"{kib:10.1f}  {where}")
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
