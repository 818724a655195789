"""The waypoint's HTTP routes: Prometheus metrics (:15020), readiness (:15021, once
configuration and certificate are in) and, on localhost only, the admin view
(:15000/config_dump); served by mesh.http_endpoints."""

from __future__ import annotations

import json
from collections.abc import Callable

from google.protobuf.json_format import MessageToDict
from prometheus_client import CollectorRegistry

from mesh.http_endpoints import Response, Route, metrics_routes, runtime_routes
from waypoint.state import WaypointState


def routes(
    registry: CollectorRegistry,
    ready: Callable[[], str | None],
    state: Callable[[], WaypointState],
    certificates: Callable[[], dict[str, str]],
) -> tuple[dict[str, Route], dict[str, Route], dict[str, Route]]:
    """(metrics, readiness, admin) routes. `ready` returns None when ready, else why not."""

    def healthz() -> Response:
        why = ready()
        body = "ready\n" if why is None else f"not ready: {why}\n"
        return (200 if why is None else 503), "text/plain", body.encode()

    def config_dump() -> Response:
        s = state()
        dump = {
            "version": s.version,
            "services": [MessageToDict(v) for v in s.services_by_host.values()],
            "workloads": [MessageToDict(w) for w in s.workloads.values()],
            "http_routes": [MessageToDict(t) for t in s.routes.values()],
            "destination_policies": [MessageToDict(d) for d in s.destination_policies.values()],
            "rate_limits": [MessageToDict(r) for r in s.rate_limits.values()],
            "http_authorization_policies": [MessageToDict(p) for p in s.authorization_policies],
            "certificates": certificates(),
        }
        return 200, "application/json", json.dumps(dump, indent=1, sort_keys=True).encode()

    admin = {"/config_dump": config_dump, **runtime_routes()}
    return metrics_routes(registry), {"/healthz/ready": healthz}, admin
