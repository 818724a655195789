"""The lab's demo backend: answers every request with who it is and who it saw connect.

Query parameters make it misbehave on purpose, so that a waypoint's resilience can be
shown and tested (they apply to every pod, or only to the pod named by ``pod``):

- ``fail=<share>``: answer that share of requests (0..1) with 503. The share is exact,
  not drawn: the pod fails a request whenever its running total of ``share`` passes a
  whole number, so ``fail=0.3`` fails 3 of every 10 and never two in a row.
- ``delay=<seconds>``: wait that long (at most 60 s) before answering.
- ``pod=<name>``: the two above apply only in the pod of that name.

A request body (``Content-Length``) is read in chunks and counted, never kept whole.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POD = os.environ.get("POD_NAME", socket.gethostname())
MAX_DELAY_SECONDS = 60.0
CHUNK = 1 << 16


class Failer:
    """Fails exactly the asked share of requests, spread evenly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owed = 0.0

    def fail(self, share: float) -> bool:
        with self._lock:
            self._owed += min(max(share, 0.0), 1.0)
            if self._owed >= 1.0 - 1e-9:
                self._owed -= 1.0
                return True
            return False


FAILER = Failer()


def _number(query: dict[str, list[str]], name: str) -> float:
    try:
        return float(query[name][0]) if name in query else 0.0
    except ValueError:
        return 0.0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._answer(411, {"pod": POD, "error": "send a Content-Length"}, close=True)
            return
        received = self._drain_body()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        applies = query.get("pod", [POD])[0] == POD
        if applies and (delay := _number(query, "delay")) > 0:
            time.sleep(min(delay, MAX_DELAY_SECONDS))
        body = {
            "pod": POD,
            "method": self.command,
            "path": self.path,
            "peer": f"{self.client_address[0]}:{self.client_address[1]}",
            "local": "{}:{}".format(*self.connection.getsockname()[:2]),
            "body_bytes": received,
        }
        if applies and FAILER.fail(_number(query, "fail")):
            self._answer(503, {**body, "failed": True})
        else:
            self._answer(200, body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

    def _drain_body(self) -> int:
        left = int(self.headers.get("Content-Length") or 0)
        received = 0
        while left > 0:
            chunk = self.rfile.read(min(left, CHUNK))
            if not chunk:
                break
            received += len(chunk)
            left -= len(chunk)
        return received

    def _answer(self, status: int, body: dict[str, object], close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        print(f"{self.client_address[0]} {format % args}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    ThreadingHTTPServer(("0.0.0.0", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
