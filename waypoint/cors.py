"""A route's CORS policy, as Envoy's CORS filter applies Istio's corsPolicy: a preflight
from an allowed origin is answered here; an actual request from one is forwarded and its
response gets the Access-Control-Allow-* headers; other origins get no CORS headers (their
preflights go on to the backend unless the policy says IGNORE)."""

from __future__ import annotations

from mesh.api import mesh_pb2
from waypoint import headers as h
from waypoint.message import BytesBody, Request, Response
from waypoint.router import string_matches

# Envoy answers an allowed preflight with 200 and no body.
PREFLIGHT_STATUS = 200


def _origin(cors: mesh_pb2.HttpCors, request: Request) -> str | None:
    """The request's Origin when the policy allows it, else None."""
    origin = h.get(request.headers, "origin")
    if origin is None or not any(string_matches(m, origin) for m in cors.allow_origins):
        return None
    return origin


def _is_preflight(request: Request) -> bool:
    return (
        request.method == "OPTIONS"
        and h.get(request.headers, "origin") is not None
        and h.get(request.headers, "access-control-request-method") is not None
    )


def preflight(cors: mesh_pb2.HttpCors, request: Request) -> Response | None:
    """The waypoint's own answer to a CORS preflight; None: the request goes on."""
    if not _is_preflight(request):
        return None
    origin = _origin(cors, request)
    if origin is None:
        if not cors.ignore_unmatched_preflights:
            return None
        return Response(PREFLIGHT_STATUS, [], BytesBody(b""))
    headers = [("access-control-allow-origin", origin)]
    if cors.allow_methods:
        headers.append(("access-control-allow-methods", ",".join(cors.allow_methods)))
    if cors.allow_headers:
        headers.append(("access-control-allow-headers", ",".join(cors.allow_headers)))
    if cors.max_age_seconds:
        headers.append(("access-control-max-age", str(cors.max_age_seconds)))
    if cors.allow_credentials:
        headers.append(("access-control-allow-credentials", "true"))
    return Response(PREFLIGHT_STATUS, headers, BytesBody(b""))


def decorate(cors: mesh_pb2.HttpCors, request: Request, response: Response) -> None:
    """The CORS headers of an actual request's response from an allowed origin."""
    origin = _origin(cors, request)
    if origin is None:
        return
    # Set, replacing the backend's own values, as Envoy's filter does.
    values = {"access-control-allow-origin": origin}
    if cors.allow_credentials:
        values["access-control-allow-credentials"] = "true"
    if cors.expose_headers:
        values["access-control-expose-headers"] = ",".join(cors.expose_headers)
    response.headers = h.mutate(response.headers, mesh_pb2.HttpHeaderMutation(set=values))
