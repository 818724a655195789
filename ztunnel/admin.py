"""ztunnel's HTTP endpoints off the data path: readiness on :15021 and, on localhost only,
the admin view on :15000 (config dump, live connections, certificates).

Stdlib servers in their own threads: a slow scrape or a curious operator can never stall
the event loop that carries traffic.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ztunnel.proxy import Ztunnel

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Response]


class _SharedPortServer(ThreadingHTTPServer):
    """SO_REUSEPORT: the next ztunnel binds its node ports while this one still serves."""

    allow_reuse_port = True
    daemon_threads = True


def serve_in_thread(address: tuple[str, int], routes: Mapping[str, Route]) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path)
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

    server = _SharedPortServer(address, Handler)
    threading.Thread(target=server.serve_forever, name=f"http-{address[1]}", daemon=True).start()
    return server


def stop_serving(server: ThreadingHTTPServer) -> None:
    """Close the port (the next generation's server takes it alone); blocks up to 0.5 s."""
    server.shutdown()
    server.server_close()


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


def metrics_routes(registry: CollectorRegistry) -> dict[str, Route]:
    def metrics() -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

    return {"/metrics": metrics}


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
