"""What a proxy process (ztunnel, waypoint) wires up the same way around its event loop:
the push stream, the drain signals, the collector's view of its startup heap, the open-file
limit."""

from __future__ import annotations

import asyncio
import gc
import resource
import signal
from collections.abc import Callable, Mapping

from mesh.api import mesh_pb2
from mesh.cert_manager import CertManager
from mesh.node_config import ControllerAccess
from mesh.push_client import PushClient


def start_push(
    access: ControllerAccess,
    apply: Callable[[str, dict[str, mesh_pb2.Resource]], None],
    certs: CertManager,
) -> PushClient:
    """The push stream (a thread), each update applied on the running loop, which owns the
    state; a (re)connected stream means the CA answers again, so renewals waiting out a
    backoff try at once."""
    loop = asyncio.get_running_loop()

    def on_update(version: str, resources: Mapping[str, mesh_pb2.Resource]) -> None:
        loop.call_soon_threadsafe(apply, version, dict(resources))

    def on_connected() -> None:
        loop.call_soon_threadsafe(certs.retry_now)

    push = access.push_client(on_update, on_connected)
    push.start()
    return push


def drain_signals() -> tuple[asyncio.Event, asyncio.Event]:
    """(stop, cut): SIGTERM or SIGINT sets `stop` (drain, however often SIGTERM comes, as a
    kubelet may repeat it); SIGINT during the drain sets `cut` (an operator ending it)."""
    loop = asyncio.get_running_loop()
    stop, cut = asyncio.Event(), asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        (cut if stop.is_set() and sig == signal.SIGINT else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop, cut


def freeze_startup_heap() -> int:
    """Collect once, then take every object alive now (modules, classes, functions: ~35k in
    a started ztunnel) out of the collector's generations for good; how many.

    Each full (gen 2) collection walked all of them: 30-50 ms of a stalled event loop on
    this 2-vCPU VM (40-125 ms in the lab's ztunnels while it was loaded), about once per
    few thousand connections. What the data path allocates afterwards is still collected
    as before. ``--workers N`` gets the same from the master's freeze before it forks.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def raise_open_file_limit() -> tuple[int, int]:
    """Soft limit on open files up to the hard one; (before, after).

    Every proxied connection holds two descriptors or more, and ztunnel keeps a few spare
    sockets per pod: systemd's and most shells' soft limit of 1024 would refuse connections
    past ~500 while the hard limit (524288 under systemd) allows far more. Envoy and Istio's
    ztunnel raise it the same way; children (``--workers``) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]
