"""The controller's process runs gRPC's classic I/O poller (controller/grpc_runtime.py).

Each probe is a fresh interpreter, since gRPC reads its experiments once, at import. gRPC's
``tcp`` tracer names the source file of each endpoint's I/O: ``tcp_posix.cc`` is the
classic poller's, ``endpoint.cc`` the EventEngine's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from controller.grpc_runtime import VARIABLE, import_grpc_with_classic_io

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import asyncio, os, sys
if sys.argv[1] == "controller":
    import controller.main
print(os.environ.get("GRPC_EXPERIMENTS", "<unset>"), flush=True)
import grpc

async def call() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
    await server.stop(0)

asyncio.run(call())
"""


def probe(first_import: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != VARIABLE}
    environ |= {"GRPC_TRACE": "tcp", "GRPC_VERBOSITY": "debug", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", PROBE, first_import],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=environ,
        cwd=ROOT,
    )


def test_controller_process_does_its_io_in_the_classic_poller_and_leaks_no_setting() -> None:
    done = probe("controller")
    assert "tcp_posix.cc" in done.stderr
    assert "endpoint.cc" not in done.stderr
    # Every name is one this grpcio knows (a grpcio that dropped one logs it, and the
    # measured setting would silently be gone).
    assert "Unknown experiment" not in done.stderr
    # Processes the controller starts (a lab's ztunnels) keep gRPC's default.
    assert done.stdout.strip() == "<unset>"


def test_without_the_controller_grpc_uses_its_default_event_engine() -> None:
    done = probe("grpc")
    assert "endpoint.cc" in done.stderr
    assert "tcp_posix.cc" not in done.stderr


def test_an_operators_own_setting_wins() -> None:
    done = probe("controller", GRPC_EXPERIMENTS="event_engine_client")
    assert "endpoint.cc" in done.stderr
    assert done.stdout.strip() == "event_engine_client"


def test_too_late_once_grpc_is_imported() -> None:
    assert "grpc" in sys.modules  # the test process imported it with the controller
    environ: dict[str, str] = {}
    import_grpc_with_classic_io(environ)
    assert environ == {}
