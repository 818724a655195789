"""The CORS decisions of waypoint/cors.py on their own."""

from __future__ import annotations

from mesh.api import mesh_pb2
from waypoint import cors
from waypoint.message import BytesBody, Request, Response

POLICY = mesh_pb2.HttpCors(allow_origins=[mesh_pb2.HttpStringMatch(prefix="https://a.")])


def request(method: str, **headers: str) -> Request:
    pairs = [(k.replace("_", "-"), v) for k, v in headers.items()]
    return Request(method, "http", "svc", "/", pairs, BytesBody(b""))


def test_only_options_with_origin_and_requested_method_is_a_preflight() -> None:
    assert cors.preflight(POLICY, request("OPTIONS", origin="https://a.x")) is None
    assert cors.preflight(POLICY, request("GET", origin="https://a.x")) is None
    answer = cors.preflight(
        POLICY, request("OPTIONS", origin="https://a.x", access_control_request_method="PUT")
    )
    assert answer is not None and answer.status == 200
    assert answer.headers == [("access-control-allow-origin", "https://a.x")]


def test_unmatched_preflights_go_on_unless_ignored() -> None:
    other = request("OPTIONS", origin="https://b.x", access_control_request_method="PUT")
    assert cors.preflight(POLICY, other) is None
    ignoring = mesh_pb2.HttpCors(
        allow_origins=POLICY.allow_origins, ignore_unmatched_preflights=True
    )
    answer = cors.preflight(ignoring, other)
    assert answer is not None and (answer.status, answer.headers) == (200, [])


def test_decorate_replaces_the_backends_values_for_allowed_origins_only() -> None:
    backend = [("access-control-allow-origin", "*"), ("x", "1")]
    response = Response(200, list(backend))
    cors.decorate(POLICY, request("GET", origin="https://a.x"), response)
    assert response.headers == [("x", "1"), ("access-control-allow-origin", "https://a.x")]
    untouched = Response(200, list(backend))
    cors.decorate(POLICY, request("GET", origin="https://b.x"), untouched)
    cors.decorate(POLICY, request("GET"), untouched)
    assert untouched.headers == backend
