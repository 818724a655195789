"""ambimesh-agent: the per-node agent (enrollment, eBPF, handing pod netns to ztunnel)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server

from agent.metrics import AgentCollector
from agent.node_agent import NodeAgent
from agent.ztunnel_link import ZtunnelLink
from bpf.loader import DEFAULT_PIN_DIR, BpfError, MeshBpf
from mesh.api import mesh_pb2
from mesh.node_config import ControllerAccess, NodeConfigError, add_controller_flags
from mesh.version import add_version_flag

log = logging.getLogger("agent")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ambimesh-agent", description=__doc__)
    add_version_flag(p)
    add_controller_flags(p)
    p.add_argument("--socket", required=True, type=Path, help="Unix socket ztunnel connects to")
    p.add_argument("--metrics-port", type=int, default=15014)
    p.add_argument(
        "--bpf-pin-dir",
        default=DEFAULT_PIN_DIR,
        help="bpffs dir for this node's maps and links (they outlive the agent)",
    )
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    access = ControllerAccess.from_args(args)
    bpf = MeshBpf(pin_dir=args.bpf_pin_dir)
    link = ZtunnelLink(args.socket, lambda pid: agent.on_ztunnel_connect(pid))
    agent = NodeAgent(args.node, bpf, link)
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    start_http_server(args.metrics_port, registry=registry)

    def on_update(version: str, resources: Mapping[str, mesh_pb2.Resource]) -> None:
        snapshot = dict(resources)
        loop.call_soon_threadsafe(agent.set_desired, snapshot)
        log.info("config version %s", version)

    push = access.push_client(on_update)
    link.bind()
    push.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(link.serve()), asyncio.create_task(agent.run())]
    log.info("agent for %s up; ztunnel socket %s", args.node, args.socket)
    try:
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter:
                task.result()  # a serving task ended: re-raise what ended it
    finally:
        for task in tasks:
            task.cancel()
        push.stop(2.0)
        link.close()
        agent.close()
        bpf.release()
        log.info("agent stopped; pods stay captured until the next agent takes over")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(run(args))
    except (BpfError, NodeConfigError, OSError) as exc:
        log.error("%s", exc)
        sys.exit(1)
