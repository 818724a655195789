"""ambimesh-ztunnel: the per-node L4 mTLS tunnel (HBONE) for every enrolled pod."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry, disable_created_metrics

from mesh.cert_manager import CertManager
from mesh.cert_metrics import CertCollector
from mesh.cgroups import CgroupError, cgroup2_mount, cgroup_of
from mesh.http_endpoints import metrics_routes, runtime_routes, serve_in_thread, stop_serving
from mesh.logfile import add_log_file_flags, configure_logging
from mesh.node_config import ControllerAccess, NodeConfigError, add_controller_flags
from mesh.proxy_process import (
    drain_signals,
    freeze_startup_heap,
    raise_open_file_limit,
    start_push,
)
from mesh.version import add_version_flag
from ztunnel.admin import admin_routes, readiness_routes
from ztunnel.connections import ConnectionTable
from ztunnel.context import ProxyContext
from ztunnel.fastpath_maps import DEFAULT_MAPS_DIR, from_flags
from ztunnel.inpod import InpodClient
from ztunnel.metrics import TcpMetrics
from ztunnel.proxy import Ztunnel
from ztunnel.workers import run_master

log = logging.getLogger("ztunnel")

CERT_TTL_SECONDS = 24 * 3600
# Long on purpose: connections are cut only when they outlive this (match the DaemonSet's
# terminationGracePeriodSeconds).
DRAIN_SECONDS = 3600.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ambimesh-ztunnel", description=__doc__)
    add_version_flag(p)
    add_controller_flags(p)
    p.add_argument("--agent-socket", required=True, type=Path, help="the node agent's socket")
    p.add_argument("--metrics-port", type=int, default=15020)
    p.add_argument("--readiness-port", type=int, default=15021)
    p.add_argument("--admin-port", type=int, default=15000, help="admin view, localhost only")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=DRAIN_SECONDS,
        help="on SIGTERM, serve established connections this long at most (SIGINT "
        "during the drain cuts them at once)",
    )
    p.add_argument(
        "--cert-ttl",
        type=_positive_int,
        default=CERT_TTL_SECONDS,
        help="lifetime in seconds asked for workload certificates (renewed at half-life; "
        "the controller caps it at its maximum, 24 h)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=default_workers(),
        help="data-path processes, each on its own event loop (default: the CPUs this process "
        "may run on, fewer under a cgroup CPU limit); with more than one, a supervisor "
        "process serves the node's ports and the agent link",
    )
    p.add_argument(
        "--same-node-fast-path",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="connections between two enrolled pods of this node skip TLS, HBONE and user "
        "space once authorized (docs/same-node-fast-path.md); off by default",
    )
    p.add_argument(
        "--bpf-maps",
        type=Path,
        default=DEFAULT_MAPS_DIR,
        help="the agent's pinned BPF maps (its --bpf-pin-dir plus /maps), for the fast path",
    )
    p.add_argument("--log-level", default="INFO")
    add_log_file_flags(p)
    return p.parse_args(argv)


def default_workers() -> int:
    """One worker per CPU we may use: the affinity mask, capped by the CPU quota of our
    cgroup and its ancestors (a DaemonSet's ``limits.cpu``), as a runtime would."""
    cpus = len(os.sched_getaffinity(0))
    try:
        group = cgroup_of("self")
        root = cgroup2_mount()
    except (OSError, CgroupError):
        return cpus
    limits = []
    for path in (group, *group.parents):
        with contextlib.suppress(OSError):
            limits.append((path / "cpu.max").read_text())
        if path == root:
            break
    return min(cpus, quota_cpus(limits) or cpus)


def quota_cpus(cpu_max_texts: Iterable[str]) -> int | None:
    """The whole CPUs the tightest ``cpu.max`` ("<quota> <period>" or "max <period>")
    allows, at least one; None without a limit."""
    limits = []
    for text in cpu_max_texts:
        quota, _, period = text.strip().partition(" ")
        if quota.isdigit() and period.isdigit() and int(period):
            limits.append(max(1, math.ceil(int(quota) / int(period))))
    return min(limits, default=None)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return int(text)


async def run(args: argparse.Namespace) -> None:
    access = ControllerAccess.from_args(args)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    certs = CertManager(lambda sid: access.fetch_identity(sid, args.cert_ttl))
    registry.register(CertCollector(certs))
    ctx = ProxyContext(
        certs=certs,
        connections=ConnectionTable(TcpMetrics(registry)),
        trust_domain=args.trust_domain,
        fast_path=from_flags(args.same_node_fast_path, args.bpf_maps),
    )
    ztunnel = Ztunnel(ctx)
    inpod = InpodClient(args.agent_socket, ztunnel.add_pod, ztunnel.del_pod, ztunnel.known_pods)
    # Two generations share these ports (SO_REUSEPORT) while one hands over to the next.
    http_servers = [
        serve_in_thread(("0.0.0.0", args.metrics_port), metrics_routes(registry)),
        serve_in_thread(
            ("0.0.0.0", args.readiness_port),
            readiness_routes(lambda: inpod.synced.is_set() and ztunnel.ready),
        ),
        serve_in_thread(
            ("127.0.0.1", args.admin_port), {**admin_routes(ztunnel), **runtime_routes()}
        ),
    ]

    push = start_push(access, ztunnel.update_state, certs)
    # Last, so that this process's own long-lived objects are frozen too.
    frozen = freeze_startup_heap()
    stop, cut = drain_signals()
    inpod_task = asyncio.create_task(inpod.run())
    log.info(
        "ztunnel for %s up (pid %d): metrics :%d, readiness :%d; %d objects frozen",
        args.node,
        os.getpid(),
        args.metrics_port,
        args.readiness_port,
        frozen,
    )
    try:
        await stop.wait()
        inpod_task.cancel()
        await asyncio.gather(*(asyncio.to_thread(stop_serving, s) for s in http_servers))
        await ztunnel.drain(args.drain_seconds, cut)
    finally:
        inpod_task.cancel()
        push.stop(2.0)
        await ztunnel.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        before, after = raise_open_file_limit()
        log.info("open files: soft limit %d (was %d)", after, before)
        if args.workers > 1:
            ControllerAccess.from_args(args)  # fail here, not in every child
            sys.exit(run_master(args))
        uvloop.run(run(args))
    except (NodeConfigError, OSError) as exc:
        log.error("%s", exc)
        sys.exit(1)
