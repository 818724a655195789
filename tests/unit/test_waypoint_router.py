"""waypoint.router: the route-table contract of docs/waypoint.md, one case per point, and
the header mutations and sniffing the request path relies on."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.api import mesh_pb2
from waypoint import headers as h
from waypoint.router import (
    RouteInput,
    pick_backend,
    redirect_location,
    replace_prefix,
    rewritten_target,
    select,
)
from waypoint.sniff import Protocol, sniff

S = mesh_pb2.HttpStringMatch


def req(target: str = "/", **kwargs: object) -> RouteInput:
    base: dict[str, object] = {
        "method": "GET",
        "target": target,
        "authority": "reviews:9080",
        "headers": [],
        "port": 9080,
    }
    base.update(kwargs)
    return RouteInput(**base)  # type: ignore[arg-type]


def table(*matches: mesh_pb2.HttpRouteMatch) -> mesh_pb2.HttpRouteTable:
    """Rule i has the i-th match; a last catch-all rule is named "default"."""
    rules = [mesh_pb2.HttpRouteRule(name=str(i), matches=[m]) for i, m in enumerate(matches)]
    return mesh_pb2.HttpRouteTable(rules=[*rules, mesh_pb2.HttpRouteRule(name="default")])


def chosen(t: mesh_pb2.HttpRouteTable, r: RouteInput) -> str | None:
    selected = select(t, r)
    return selected.rule.name if selected else None


GATEWAY_PREFIX = S(regex="(?P<prefix>/foo)(?:/.*)?")


@pytest.mark.parametrize(
    ("match", "path", "hit"),
    [
        (S(exact="/a"), "/a", True),
        (S(exact="/a"), "/a/", False),
        (S(exact="/a"), "/a?x=1", True),  # the query string is not part of the path
        (S(prefix="/foo"), "/foobar", True),  # Istio: a plain string prefix
        (S(regex="/v[0-9]+/.*"), "/v2/x", True),
        (S(regex="/v[0-9]+"), "/v2/x", False),  # full match
        (S(regex="("), "/anything", False),  # an invalid regex matches nothing
        (GATEWAY_PREFIX, "/foo", True),
        (GATEWAY_PREFIX, "/foo/", True),
        (GATEWAY_PREFIX, "/foo/bar", True),
        (GATEWAY_PREFIX, "/foobar", False),  # Gateway API segment semantics
    ],
)
def test_path_matches(match: mesh_pb2.HttpStringMatch, path: str, hit: bool) -> None:
    t = table(mesh_pb2.HttpRouteMatch(path=match))
    assert chosen(t, req(path)) == ("0" if hit else "default")


def test_first_matching_rule_wins_and_no_rule_is_none() -> None:
    t = mesh_pb2.HttpRouteTable(
        rules=[
            mesh_pb2.HttpRouteRule(name="a", matches=[mesh_pb2.HttpRouteMatch(method="POST")]),
            mesh_pb2.HttpRouteRule(
                name="b",
                matches=[
                    mesh_pb2.HttpRouteMatch(path=S(prefix="/x")),
                    mesh_pb2.HttpRouteMatch(path=S(prefix="/y")),
                ],
            ),
        ]
    )
    assert chosen(t, req("/y/1", method="POST")) == "a"
    assert chosen(t, req("/y/1")) == "b"
    assert chosen(t, req("/z")) is None


def test_headers_query_method_port_and_source() -> None:
    header = mesh_pb2.HttpRouteMatch(
        headers=[mesh_pb2.HttpHeaderMatch(name="end-user", value=S(exact="jason"))]
    )
    present = mesh_pb2.HttpRouteMatch(headers=[mesh_pb2.HttpHeaderMatch(name="x-debug")])
    inverted = mesh_pb2.HttpRouteMatch(
        headers=[mesh_pb2.HttpHeaderMatch(name="x-canary", value=S(exact="1"), invert=True)]
    )
    query = mesh_pb2.HttpRouteMatch(
        query_params=[mesh_pb2.HttpQueryMatch(name="v", value=S(regex="[0-9]+"))]
    )
    authority = mesh_pb2.HttpRouteMatch(
        headers=[mesh_pb2.HttpHeaderMatch(name=":authority", value=S(prefix="reviews"))]
    )
    source = mesh_pb2.HttpRouteMatch(source_namespace="demo", source_labels={"app": "sleep"})
    port = mesh_pb2.HttpRouteMatch(port=8080)
    t = table(header, present, query, port, source, inverted, authority)
    assert chosen(t, req(headers=[("end-user", "jason")])) == "0"
    assert chosen(t, req(headers=[("x-debug", "")])) == "1"
    assert chosen(t, req("/?a=b&v=12")) == "2"
    assert chosen(t, req("/?v=x1")) == "5"  # x-canary absent: the inverted match holds
    assert chosen(t, req(port=8080)) == "3"
    labels = {"app": "sleep", "version": "v1"}
    assert chosen(t, req(source_namespace="demo", source_labels=labels)) == "4"
    assert chosen(t, req(source_namespace="other", source_labels=labels)) == "5"
    assert chosen(t, req(headers=[("x-canary", "1")])) == "6"
    two_values = [("end-user", "a"), ("end-user", "jason")]  # joined: "a,jason"
    assert chosen(t, req(headers=two_values)) == "5"


@pytest.mark.parametrize(
    ("path", "prefix", "replacement", "expected"),
    [
        ("/foo/x", "/foo", "/bar", "/bar/x"),
        ("/foo", "/foo", "/bar", "/bar"),
        ("/foo/x", "/foo", "/", "/x"),
        ("/foo", "/foo", "/", "/"),
        ("/foo/x", "/foo/", "/bar", "/bar/x"),
        ("/foobar", "/foo", "/bar", "/barbar"),  # Istio's plain prefix rewrite
    ],
)
def test_replace_prefix(path: str, prefix: str, replacement: str, expected: str) -> None:
    assert replace_prefix(path, prefix, replacement) == expected


def test_rewrite_keeps_the_query_and_uses_the_named_prefix_group() -> None:
    selected = select(table(mesh_pb2.HttpRouteMatch(path=GATEWAY_PREFIX)), req("/foo/a?q=1"))
    assert selected is not None and selected.prefix == "/foo"
    rewrite = mesh_pb2.HttpRewrite(prefix="/v2")
    assert rewritten_target(rewrite, req("/foo/a?q=1"), selected.prefix) == "/v2/a?q=1"
    full = mesh_pb2.HttpRewrite(path="/static")
    assert rewritten_target(full, req("/foo/a?q=1"), "/foo") == "/static?q=1"


@pytest.mark.parametrize(
    ("redirect", "expected"),
    [
        (mesh_pb2.HttpRedirect(), "http://reviews:9080/old/x?q=1"),
        (mesh_pb2.HttpRedirect(hostname="new"), "http://new:9080/old/x?q=1"),
        (mesh_pb2.HttpRedirect(scheme="https"), "https://reviews/old/x?q=1"),
        (mesh_pb2.HttpRedirect(scheme="https", port=8443), "https://reviews:8443/old/x?q=1"),
        (mesh_pb2.HttpRedirect(port=80), "http://reviews/old/x?q=1"),
        (mesh_pb2.HttpRedirect(path="/new"), "http://reviews:9080/new?q=1"),
        (mesh_pb2.HttpRedirect(prefix="/new"), "http://reviews:9080/new/x?q=1"),
    ],
)
def test_redirect_location(redirect: mesh_pb2.HttpRedirect, expected: str) -> None:
    assert redirect_location(redirect, req("/old/x?q=1"), "/old") == expected


def test_weighted_backend_choice_follows_weights() -> None:
    backends = [
        mesh_pb2.HttpBackend(service="a", weight=90),
        mesh_pb2.HttpBackend(service="b", weight=10),
        mesh_pb2.HttpBackend(service="never", weight=0),
    ]
    rng = random.Random(7)
    counts = Counter(pick_backend(backends, rng).service for _ in range(10_000))
    assert counts["never"] == 0
    assert 850 <= counts["b"] <= 1150, counts  # mean 1000, sd 30
    equal = [mesh_pb2.HttpBackend(service=s) for s in "xy"]
    assert set(pick_backend(equal, rng).service for _ in range(100)) == {"x", "y"}


def test_header_mutation_order_and_hop_by_hop() -> None:
    mutation = mesh_pb2.HttpHeaderMutation(set={"x-a": "new"}, add={"x-b": "2"}, remove=["x-gone"])
    before = [("x-a", "old"), ("x-a", "old2"), ("x-b", "1"), ("x-gone", "1")]
    assert h.mutate(before, mutation) == [("x-b", "1"), ("x-a", "new"), ("x-b", "2")]
    incoming = [
        ("connection", "keep-alive, x-private"),
        ("x-private", "1"),
        ("keep-alive", "5"),
        ("host", "h"),
        ("transfer-encoding", "chunked"),
        ("x-real", "1"),
    ]
    assert h.end_to_end(incoming) == [("x-real", "1")]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", None),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Protocol.HTTP2),
        (b"PRI * HT", None),
        (b"GET / HTTP/1.1\r\n", Protocol.HTTP1),
        (b"DELETE /x?y HTTP/1.0\n", Protocol.HTTP1),
        (b"GET /long", None),
        (b"GET / HTTP/2\r\n", Protocol.TCP),
        (b"\x16\x03\x01\x02\x00", Protocol.TCP),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH\r\n", Protocol.TCP),
        (b"A" * 9000, Protocol.TCP),  # no request line within the limit
    ],
)
def test_sniff(data: bytes, expected: Protocol | None) -> None:
    assert sniff(data) == expected
