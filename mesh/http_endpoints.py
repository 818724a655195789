"""The small HTTP endpoints of a proxy, off its data path (metrics, readiness, admin).

Stdlib servers in their own threads: a slow scrape or a curious operator can never stall
the event loop that carries traffic. SO_REUSEPORT, so the next generation of a proxy binds
the same ports while this one still serves (a handover).
"""

from __future__ import annotations

import gc
import json
import sys
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[], Response]


class _SharedPortServer(ThreadingHTTPServer):
    allow_reuse_port = True
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

    server = _SharedPortServer(address, Handler)
    threading.Thread(target=server.serve_forever, name=f"http-{address[1]}", daemon=True).start()
    return server


def stop_serving(server: ThreadingHTTPServer) -> None:
    """Close the port (a next generation's server then takes it alone); blocks up to 0.5 s."""
    server.shutdown()
    server.server_close()


def metrics_routes(registry: CollectorRegistry) -> dict[str, Route]:
    def metrics() -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

    return {"/metrics": metrics}


def runtime_routes() -> dict[str, Route]:
    """``/runtime``: how the interpreter runs this process (objects frozen out of the
    collector, its thresholds and collections per generation, the GIL's switch interval,
    the threads that may take the GIL from the event loop)."""

    def runtime() -> Response:
        body = {
            "gc": {
                "frozen_objects": gc.get_freeze_count(),
                "thresholds": gc.get_threshold(),
                "pending": gc.get_count(),
                "generations": gc.get_stats(),
            },
            "switch_interval_seconds": sys.getswitchinterval(),
            "threads": sorted(t.name for t in threading.enumerate()),
        }
        return 200, "application/json", json.dumps(body, indent=1).encode()

    return {"/runtime": runtime}
