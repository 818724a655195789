"""ambimesh-waypoint: the L7 proxy of one Gateway (class ambimesh-waypoint), run as a pod
process in its own network namespace. Reads the controller's push stream, gets its own
certificate from the CA, and serves HBONE on 15008."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from functools import partial

import uvloop
from prometheus_client import CollectorRegistry, disable_created_metrics

from mesh.cert_manager import CertManager
from mesh.hbone.protocol import HBONE_PORT
from mesh.http_endpoints import serve_in_thread, stop_serving
from mesh.log_format import SecondCachedFormatter
from mesh.logfile import collect_only_shown_fields
from mesh.node_config import ControllerAccess, NodeConfigError, add_controller_flags
from mesh.proxy_process import (
    drain_signals,
    freeze_startup_heap,
    raise_open_file_limit,
    start_push,
)
from mesh.spiffe import SpiffeError, SpiffeId
from mesh.version import add_version_flag
from waypoint.access_log import LoopBatchedHandler
from waypoint.admin import routes
from waypoint.downstream_h1 import HEADERS_TIMEOUT
from waypoint.observe import access as access_logger
from waypoint.server import Waypoint

log = logging.getLogger("waypoint")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

CERT_TTL_SECONDS = 24 * 3600
# Envoy waypoints drain for terminationGracePeriodSeconds (30 s by default on Kubernetes).
DRAIN_SECONDS = 30.0
CERT_RETRY_SECONDS = 2.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ambimesh-waypoint", description=__doc__)
    add_version_flag(p)
    add_controller_flags(p)
    p.add_argument("--name", required=True, help="the Gateway this waypoint serves")
    p.add_argument("--namespace", required=True, help="the Gateway's namespace")
    p.add_argument("--service-account", default="", help="this pod's (default: --name)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--listen", default="0.0.0.0", help="address for HBONE, metrics, readiness")
    p.add_argument("--hbone-port", type=int, default=HBONE_PORT)
    p.add_argument("--metrics-port", type=int, default=15020)
    p.add_argument("--readiness-port", type=int, default=15021)
    p.add_argument("--admin-port", type=int, default=15000, help="admin view, localhost only")
    p.add_argument(
        "--otlp-endpoint", default="", help="host:port of an OTLP/gRPC collector for spans"
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=DRAIN_SECONDS,
        help="on SIGTERM, serve the tunnels in flight this long at most (SIGINT cuts)",
    )
    p.add_argument(
        "--request-headers-timeout",
        type=float,
        default=HEADERS_TIMEOUT,
        help="seconds from a request's first byte to the end of its head; then 408",
    )
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def first_certificate(certs: CertManager, sid: SpiffeId) -> None:
    """The CA signs only once the controller knows this pod: ask until it does."""
    while True:
        try:
            await certs.server_context(sid)
            return
        except Exception as exc:  # any CA or network failure: the same answer, try again
            log.warning("no certificate for %s yet, retrying: %s", sid, exc)
            await asyncio.sleep(CERT_RETRY_SECONDS)


async def run(args: argparse.Namespace) -> None:
    access = ControllerAccess.from_args(args)
    sid = SpiffeId(args.trust_domain, args.namespace, args.service_account or args.name)
    certs = CertManager(lambda sid: access.fetch_identity(sid, CERT_TTL_SECONDS))
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    exporter = None
    if args.otlp_endpoint:
        from waypoint.otlp import SpanExporter  # the OpenTelemetry SDK only when asked for

        exporter = SpanExporter(args.otlp_endpoint, f"{args.name}.{args.namespace}")
    waypoint = Waypoint(
        f"{args.namespace}/{args.name}",
        partial(certs.client_context, sid),
        registry=registry,
        exporter=exporter,
        headers_timeout=args.request_headers_timeout,
    )
    have_cert = asyncio.Event()
    stop, cut = drain_signals()

    def ready() -> str | None:
        if stop.is_set():
            return "draining"
        if not waypoint.synced:
            return "no configuration from the controller yet"
        return None if have_cert.is_set() else f"no certificate for {sid} yet"

    metrics, readiness, admin = routes(
        registry,
        ready,
        lambda: waypoint.state,
        lambda: {s.uri: t.isoformat() for s, t in certs.expiries()},
    )
    http_servers = [
        serve_in_thread((args.listen, args.metrics_port), metrics),
        serve_in_thread((args.listen, args.readiness_port), readiness),
        serve_in_thread(("127.0.0.1", args.admin_port), admin),
    ]

    access_log = batch_access_log()
    push = start_push(access, waypoint.update_state, certs)
    try:
        cert_wait = asyncio.create_task(first_certificate(certs, sid))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({cert_wait, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            cert_wait.cancel()
            return
        sock = socket.create_server((args.listen, args.hbone_port), backlog=1024)
        await waypoint.serve(sock, await certs.server_context(sid))
        have_cert.set()
        # Last, so that the serving waypoint's own long-lived objects are frozen too.
        frozen = freeze_startup_heap()
        log.info(
            "waypoint %s up (pid %d) as %s: HBONE :%d, metrics :%d, readiness :%d; "
            "%d startup objects frozen out of the collector",
            waypoint.ref,
            os.getpid(),
            sid,
            args.hbone_port,
            args.metrics_port,
            args.readiness_port,
            frozen,
        )
        await stopped
        await waypoint.drain(args.drain_seconds, cut)
    finally:
        await asyncio.gather(*(asyncio.to_thread(stop_serving, s) for s in http_servers))
        push.stop(2.0)
        certs.close()
        await waypoint.close()
        if exporter is not None:
            exporter.shutdown()
        access_log.flush()


def batch_access_log() -> LoopBatchedHandler:
    """The access lines to stderr like every other line and in the same format, but
    written once per loop iteration (waypoint/access_log.py), the date formatted once per
    second rather than once per request."""
    handler = LoopBatchedHandler(asyncio.get_running_loop())
    handler.setFormatter(SecondCachedFormatter(LOG_FORMAT))
    access_logger.addHandler(handler)
    access_logger.propagate = False
    return handler


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # one access line per request: no stack walk, getpid or thread lookup for each
    collect_only_shown_fields(LOG_FORMAT)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    try:
        raise_open_file_limit()
        uvloop.run(run(args))
    except (NodeConfigError, OSError, SpiffeError) as exc:
        log.error("%s", exc)
        sys.exit(1)
