"""What a proxy process (ztunnel, waypoint) wires up the same way around its event loop:
the push stream and the drain signals."""

from __future__ import annotations

import asyncio
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
