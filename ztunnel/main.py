"""ambimesh-ztunnel: the per-node L4 mTLS tunnel (HBONE) for every enrolled pod."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import uvloop
from prometheus_client import CollectorRegistry, disable_created_metrics

from mesh.cert_manager import CertManager
from mesh.cert_metrics import CertCollector
from mesh.http_endpoints import metrics_routes, serve_in_thread, stop_serving
from mesh.node_config import ControllerAccess, NodeConfigError, add_controller_flags
from mesh.proxy_process import drain_signals, start_push
from mesh.version import add_version_flag
from ztunnel.admin import admin_routes, readiness_routes
from ztunnel.connections import ConnectionTable
from ztunnel.context import ProxyContext
from ztunnel.inpod import InpodClient
from ztunnel.metrics import TcpMetrics
from ztunnel.proxy import Ztunnel

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
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
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
        serve_in_thread(("127.0.0.1", args.admin_port), admin_routes(ztunnel)),
    ]

    push = start_push(access, ztunnel.update_state, certs)
    stop, cut = drain_signals()
    inpod_task = asyncio.create_task(inpod.run())
    log.info(
        "ztunnel for %s up (pid %d): metrics :%d, readiness :%d",
        args.node,
        os.getpid(),
        args.metrics_port,
        args.readiness_port,
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
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        uvloop.run(run(args))
    except (NodeConfigError, OSError) as exc:
        log.error("%s", exc)
        sys.exit(1)
