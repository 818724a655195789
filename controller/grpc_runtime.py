"""The controller's gRPC runtime: gRPC core's classic I/O poller, not its EventEngine.

grpcio turned the EventEngine on for Python in 2026; with it, every message of every
stream hops between gRPC's I/O threads and the asyncio poller. At 1000 nodes a relabel is
1000 deltas out and 1000 ACKs in, and with the classic poller (Python's default until
then: the I/O in gRPC's one polling thread) the controller spends a fifth less CPU on
it (docs/performance.md, "Controller at scale"). Only the controller: a node's ztunnel
sends one stream's messages, and processes the controller's process starts (a lab's
ztunnels) keep gRPC's default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

VARIABLE = "GRPC_EXPERIMENTS"
CLASSIC_IO = (
    "-event_engine_client",
    "-event_engine_listener",
    "-event_engine_for_all_other_endpoints",
    "-event_engine_callback_cq",
)


def import_grpc_with_classic_io(environ: MutableMapping[str, str] = os.environ) -> None:
    """gRPC reads :data:`VARIABLE` once, when ``grpc`` is first imported: so import it here,
    with the variable set for just that moment. An operator's own setting wins; once grpc
    is imported it is too late, and nothing changes."""
    if "grpc" in sys.modules or VARIABLE in environ:
        return
    environ[VARIABLE] = ",".join(CLASSIC_IO)
    try:
        import grpc  # noqa: F401
    finally:
        del environ[VARIABLE]
