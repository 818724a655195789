"""The waypoint's HTTP endpoints off the data path: Prometheus metrics (:15020), readiness
(:15021, once configuration and certificate are in) and, on localhost only, the admin
view (:15000/config_dump). Stdlib servers in their own threads, so a slow scrape never
stalls the event loop that carries requests."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from waypoint.state import WaypointState

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Response]


class _Server(ThreadingHTTPServer):
    daemon_threads = True


def serve_in_thread(address: tuple[str, int], routes: Mapping[str, Route]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.partition("?")[0])
            if route is None:
                self.send_error(404, explain=f"try one of: {', '.join(sorted(routes))}")
                return
            status, content_type, body = route()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = _Server(address, Handler)
    threading.Thread(target=server.serve_forever, name=f"http-{address[1]}", daemon=True).start()
    return server


def routes(
    registry: CollectorRegistry,
    ready: Callable[[], str | None],
    state: Callable[[], WaypointState],
    certificates: Callable[[], dict[str, str]],
) -> tuple[dict[str, Route], dict[str, Route], dict[str, Route]]:
    """(metrics, readiness, admin) routes. `ready` returns None when ready, else why not."""

    def metrics() -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

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

    return {"/metrics": metrics}, {"/healthz/ready": healthz}, {"/config_dump": config_dump}


def stop_serving(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()
