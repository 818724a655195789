"""ztunnel's HTTP routes: readiness on :15021 and, on localhost only, the admin view on
:15000 (config dump, live connections, certificates); served by mesh.http_endpoints."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from google.protobuf.json_format import MessageToDict

from mesh.http_endpoints import Response, Route
from ztunnel.proxy import Ztunnel


def readiness_routes(ready: Callable[[], bool]) -> dict[str, Route]:
    """The body names the process: during a handover both generations answer here."""
    pid = os.getpid()

    def healthz() -> Response:
        ok = ready()
        return (
            (200 if ok else 503),
            "text/plain",
            f"{'' if ok else 'not '}ready pid={pid}\n".encode(),
        )

    return {"/healthz/ready": healthz}


def admin_routes(ztunnel: Ztunnel) -> dict[str, Route]:
    def as_json(data: object) -> Response:
        return 200, "application/json", json.dumps(data, indent=1, sort_keys=True).encode()

    def config_dump() -> Response:
        state = ztunnel.ctx.state
        return as_json(
            {
                "version": state.version,
                "workloads": [MessageToDict(w) for w in state.workloads.values()],
                "services": [MessageToDict(s) for s in state.services_by_vip.values()],
                "peer_authentications": [MessageToDict(p) for p in state.peer_authentications],
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
        )

    def connections() -> Response:
        return as_json(ztunnel.ctx.connections.live())

    return {"/config_dump": config_dump, "/connections": connections}
