"""ztunnel's HTTP routes: readiness on :15021 and, on localhost only, the admin view on
:15000 (config dump: mesh state with its policies, local pods, certificate expiries; live
connections), read by `ambimesh ztunnel-config`; served by mesh.http_endpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from google.protobuf.json_format import MessageToDict

from mesh.heap_report import heap_report
from mesh.http_endpoints import Response, Route
from ztunnel.proxy import Ztunnel
from ztunnel.state import MeshState


def readiness_routes(ready: Callable[[], bool], pid: int | None = None) -> dict[str, Route]:
    """The body names the process (``pid``: the one started, when workers serve for it):
    during a handover both generations answer here."""
    pid = pid or os.getpid()

    def healthz() -> Response:
        ok = ready()
        return (
            (200 if ok else 503),
            "text/plain",
            f"{'' if ok else 'not '}ready pid={pid}\n".encode(),
        )

    return {"/healthz/ready": healthz}


def as_json(data: object) -> Response:
    return 200, "application/json", json.dumps(data, indent=1, sort_keys=True).encode()


def state_dump(state: MeshState) -> dict[str, object]:
    """The mesh as this process sees it (a worker's part of the node's config dump)."""
    return {
        "version": state.version,
        "workloads": [MessageToDict(w) for w in state.workloads.values()],
        "services": [MessageToDict(s) for s in state.services_by_vip.values()],
        "peer_authentications": [MessageToDict(p) for p in state.peer_authentications],
        "authorization_policies": [
            MessageToDict(p) for policies in state.authorization_policies.values() for p in policies
        ],
    }


def admin_routes(ztunnel: Ztunnel) -> dict[str, Route]:
    def config_dump() -> object:
        return {
            **state_dump(ztunnel.ctx.state),
            "local_pods": [
                {
                    "uid": uid,
                    "pod": p.pod.ref,
                    "identity": p.pod.identity.uri,
                    "addresses": list(p.pod.info.addresses),
                    "hbone_serving": p.serving,
                }
                for uid, p in list(ztunnel.pods.items())
            ],
            "certificates": {
                sid.uri: expiry.isoformat() for sid, expiry in ztunnel.ctx.certs.expiries()
            },
        }

    return admin_routes_of(config_dump, ztunnel.ctx.connections.live)


def admin_routes_of(
    config_dump: Callable[[], object], connections: Callable[[], object]
) -> dict[str, Route]:
    """The admin view's routes, whoever assembles the data (one process, or a supervisor
    asking its workers)."""
    return {
        "/config_dump": lambda: as_json(config_dump()),
        "/connections": lambda: as_json(connections()),
        # This process's memory: with workers, the supervisor's (each worker's is its own).
        "/debug/memory": lambda: as_json(heap_report(limit=100)),
    }
