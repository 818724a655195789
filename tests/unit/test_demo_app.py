"""The lab's demo backend on loopback: its failure and delay knobs and body counting, which
the waypoint's lab tests rely on."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from ambimesh.lab import demo_app


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(demo_app, "FAILER", demo_app.Failer())  # nothing owed from before
    server = ThreadingHTTPServer(("127.0.0.1", 0), demo_app.Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def call(
    port: int, path: str, method: str = "GET", body: bytes = b""
) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body or None)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_fail_share_is_exact_and_never_twice_in_a_row(app: int) -> None:
    statuses = [call(app, "/x?fail=0.3")[0] for _ in range(20)]
    assert statuses.count(503) == 6
    assert all(a != 503 or b != 503 for a, b in itertools.pairwise(statuses))
    assert {call(app, "/x?fail=1")[0] for _ in range(3)} == {503}
    assert {call(app, "/x")[0] for _ in range(3)} == {200}


def test_knobs_apply_only_in_the_named_pod(app: int) -> None:
    assert call(app, f"/x?fail=1&pod={demo_app.POD}")[0] == 503
    assert call(app, "/x?fail=1&pod=someone-else&delay=30")[0] == 200


def test_a_body_is_counted_and_the_connection_kept_alive(app: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", app, timeout=10)
    try:
        for size in (0, 10, 300_000):
            conn.request("POST", "/upload", body=b"a" * size)
            response = conn.getresponse()
            assert json.loads(response.read())["body_bytes"] == size
        assert response.getheader("Connection") is None
    finally:
        conn.close()


def test_chunked_uploads_are_refused_by_name(app: int) -> None:
    with socket.create_connection(("127.0.0.1", app), timeout=10) as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 411 ")
    assert "Content-Length" in json.loads(body)["error"]
