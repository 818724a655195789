"""HTTPRoute (GAMMA) -> route tables, checked by routing requests through the table as the
waypoint would (tests/unit/route_oracle.py). Cases mirror kubernetes-sigs/gateway-api
conformance tests (conformance/tests/mesh/*, httproute-*)."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from controller.translate import ConfigError
from mesh.api import mesh_pb2
from tests.unit.l7_objects import (
    backend,
    echo_services,
    http_route,
    match,
    rule,
    run,
    service,
    table,
)
from tests.unit.route_oracle import Request, backend_names, rewritten_path, route


def hit(
    rules: list[dict[str, Any]], request: Request, port: int | None = 80
) -> list[str] | int | None:
    """Backends the request goes to, the direct status, or None (no rule: 404)."""
    out = run(*echo_services(), http_route("r", rules, port=port))
    found = route(table(out, port=port or 0), request)
    if found is None:
        return None
    return found.direct_status or backend_names(found)


def set_headers(routes: mesh_pb2.HttpRouteTable, path: str) -> dict[str, str]:
    """The response headers the rule a request hits sets."""
    found = route(routes, Request(path))
    assert found is not None
    return dict(found.response_headers.set)


V1, V2, V3 = ["echo-v1"], ["echo-v2"], ["echo-v3"]

# mesh/httproute-matching: PathPrefix is segment-wise; matches of one rule are ORed.
MESH_MATCHING = [
    rule(match("/"), match(headers={"version": "one"}), to=[backend("echo-v1")]),
    rule(match("/v2"), match(headers={"version": "two"}), to=[backend("echo-v2")]),
]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (Request("/"), V1),
        (Request("/example"), V1),
        (Request("/", headers={"Version": "one"}), V1),
        (Request("/v2"), V2),
        (Request("/v2/example"), V2),
        (Request("/", headers={"Version": "two"}), V2),
        (Request("/v2/"), V2),
        (Request("/v2example"), V1),
        (Request("/foo/v2/example"), V1),
    ],
)
def test_mesh_matching(request_: Request, expected: list[str]) -> None:
    assert hit(MESH_MATCHING, request_) == expected


# httproute-path-match-order: Exact beats any prefix, longer prefixes beat shorter ones.
PATH_ORDER = [
    rule(match("/match", "Exact"), to=[backend("echo-v1")]),
    rule(match("/match/exact", "Exact"), to=[backend("echo-v2")]),
    rule(match("/match/exact/one", "Exact"), to=[backend("echo-v3")]),
    rule(match("/match/"), to=[backend("echo-v3")]),
    rule(match("/match/prefix/"), to=[backend("echo-v1")]),
    rule(match("/match/prefix/one"), to=[backend("echo-v2")]),
]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/match/exact/one", V3),
        ("/match/exact", V2),
        ("/match", V1),
        ("/match/prefix/one/any", V2),
        ("/match/prefix/any", V1),
        ("/match/any", V3),
    ],
)
def test_path_match_order(path: str, expected: list[str]) -> None:
    assert hit(PATH_ORDER, Request(path)) == expected


# httproute-header-matching: more header matches win; header names are case-insensitive.
HEADERS = [
    rule(match(headers={"version": "one"}), to=[backend("echo-v1")]),
    rule(match(headers={"version": "two"}), to=[backend("echo-v2")]),
    rule(match(headers={"version": "two", "color": "orange"}), to=[backend("echo-v1")]),
    rule(
        match(headers={"color": "blue"}), match(headers={"color": "green"}), to=[backend("echo-v1")]
    ),
    rule(
        match(headers={"color": "red"}), match(headers={"color": "yellow"}), to=[backend("echo-v2")]
    ),
]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Version": "one"}, V1),
        ({"Version": "two"}, V2),
        ({"Version": "two", "Color": "orange"}, V1),
        ({"Version": "two", "Color": "blue"}, V2),
        ({"Color": "orange"}, None),
        ({"Some-Other-Header": "one"}, None),
        ({"Color": "blue"}, V1),
        ({"Color": "green"}, V1),
        ({"Color": "red"}, V2),
        ({"Color": "yellow"}, V2),
        ({"Color": "purple"}, None),
    ],
)
def test_header_matching(headers: dict[str, str], expected: list[str] | None) -> None:
    assert hit(HEADERS, Request("/", headers=headers)) == expected


# httproute-method-matching: a method match outranks header matches, a path outranks both.
METHODS = [
    rule(match(method="POST"), to=[backend("echo-v1")]),
    rule(match(method="GET"), to=[backend("echo-v2")]),
    rule(match("/path1", method="GET"), to=[backend("echo-v1")]),
    rule(match(headers={"version": "one"}, method="PUT"), to=[backend("echo-v2")]),
    rule(match("/path2", headers={"version": "two"}, method="POST"), to=[backend("echo-v3")]),
    rule(
        match("/path3", method="PATCH"),
        match("/path4", headers={"version": "three"}, method="DELETE"),
        to=[backend("echo-v1")],
    ),
    rule(match("/path5"), to=[backend("echo-v1")]),
    rule(match(method="PATCH"), to=[backend("echo-v2")]),
    rule(match(headers={"version": "four"}), to=[backend("echo-v3")]),
]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (Request("/", "POST"), V1),
        (Request("/", "GET"), V2),
        (Request("/", "HEAD"), None),
        (Request("/path1", "GET"), V1),
        (Request("/", "PUT", {"version": "one"}), V2),
        (Request("/path2", "POST", {"version": "two"}), V3),
        (Request("/path3", "PATCH"), V1),
        (Request("/path4", "DELETE", {"version": "three"}), V1),
        (Request("/", "PUT"), None),
        (Request("/path4", "DELETE"), None),
        (Request("/path5", "PATCH"), V1),
        (Request("/", "PATCH", {"version": "four"}), V2),
    ],
)
def test_method_matching(request_: Request, expected: list[str] | None) -> None:
    assert hit(METHODS, request_) == expected


# mesh/httproute-query-param-matching
QUERY = [
    rule(match(query={"animal": "whale"}), to=[backend("echo-v1")]),
    rule(match(query={"animal": "dolphin"}), to=[backend("echo-v2")]),
    rule(match("/path1", query={"animal": "whale"}), to=[backend("echo-v1")]),
    rule(match(headers={"version": "one"}, query={"animal": "whale"}), to=[backend("echo-v2")]),
    rule(
        match("/path3", query={"animal": "shark"}),
        match("/path4", headers={"version": "three"}, query={"animal": "kraken"}),
        to=[backend("echo-v1")],
    ),
    rule(match("/path5"), to=[backend("echo-v1")]),
    rule(match(query={"animal": "hydra"}), to=[backend("echo-v2")]),
]


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (Request("/", query={"animal": "whale"}), V1),
        (Request("/", query={"animal": "dolphin"}), V2),
        (Request("/", query={"animal": "whale", "otherparam": "irrelevant"}), V1),
        (Request("/", query={"color": "blue"}), None),
        (Request("/", query={"animal": "whaledolphin"}), None),
        (Request("/"), None),
        (Request("/path1", query={"animal": "whale"}), V1),
        (Request("/", headers={"version": "one"}, query={"animal": "whale"}), V2),
        (Request("/path3", query={"animal": "shark"}), V1),
        (Request("/path4", headers={"version": "three"}, query={"animal": "kraken"}), V1),
        (Request("/", query={"animal": "shark"}), None),
        (Request("/path4", query={"animal": "kraken"}), None),
        (Request("/path5", query={"animal": "hydra"}), V1),
    ],
)
def test_query_param_matching(request_: Request, expected: list[str] | None) -> None:
    assert hit(QUERY, request_) == expected


def test_matching_across_routes_oldest_route_then_name_wins_ties() -> None:
    """httproute-matching-across-routes: equal matches of two routes: the older route wins,
    and for equal age the first by namespace/name; rule order only within a route."""
    same = [rule(match("/same"), to=[backend("echo-v1")])]
    other = [rule(match("/same"), to=[backend("echo-v2")])]
    older = "2024-01-01T00:00:00Z"
    newer = "2025-01-01T00:00:00Z"
    out = run(
        *echo_services(),
        http_route("b", same, created=newer),
        http_route("a", other, created=older),
    )
    assert backend_names(route(table(out), Request("/same"))) == V2  # type: ignore[arg-type]
    out = run(*echo_services(), http_route("b", same), http_route("a", other))
    assert backend_names(route(table(out), Request("/same"))) == V2  # type: ignore[arg-type]
    longer = [rule(match("/same/longer"), to=[backend("echo-v1")])]
    out = run(
        *echo_services(),
        http_route("z", longer, created=newer),
        http_route("a", other, created=older),
    )
    assert backend_names(route(table(out), Request("/same/longer/x"))) == V1  # type: ignore[arg-type]
    assert table(out).sources == ["HTTPRoute demo/a", "HTTPRoute demo/z"]


def test_regular_expression_path_ranks_below_prefix() -> None:
    rules = [
        rule(match("/api/.*", "RegularExpression"), to=[backend("echo-v1")]),
        rule(match("/api"), to=[backend("echo-v2")]),
    ]
    assert hit(rules, Request("/api/x")) == V2
    assert hit(rules[:1], Request("/api/x")) == V1
    assert hit(rules[:1], Request("/api")) is None


def test_mesh_split_exact_paths() -> None:
    rules = [
        rule(match("/v1", "Exact"), to=[backend("echo-v1", 80)]),
        rule(match("/v2", "Exact"), to=[backend("echo-v2", 80)]),
    ]
    assert hit(rules, Request("/v1"), port=None) == V1
    assert hit(rules, Request("/v2"), port=None) == V2
    assert hit(rules, Request("/v3"), port=None) is None


def test_mesh_ports_route_with_port_applies_to_that_port_only() -> None:
    """mesh-ports: a parentRef with a port gets a table for that port; the Service-wide
    table (port 0) holds only routes without a port, and a port's table holds both."""
    set_header = [
        {
            "type": "ResponseHeaderModifier",
            "responseHeaderModifier": {"set": [{"name": "X-Header-Set", "value": "v1"}]},
        }
    ]
    wide = [
        {
            "type": "ResponseHeaderModifier",
            "responseHeaderModifier": {"set": [{"name": "X-Header-Set", "value": "all"}]},
        }
    ]
    out = run(
        *echo_services(),
        http_route(
            "v1",
            [rule(match("/only80"), to=[backend("echo-v1", 80)], filters=set_header)],
            parent="echo-v1",
            port=80,
        ),
        http_route("wide", [rule(to=[backend("echo-v1", 80)], filters=wide)], parent="echo-v1"),
    )
    port_80 = table(out, "echo-v1", 80)
    assert port_80.port == 80 and port_80.service == "echo-v1.demo.svc.cluster.local"
    assert set_headers(port_80, "/only80") == {"x-header-set": "v1"}
    assert set_headers(port_80, "/x") == {"x-header-set": "all"}
    wide_table = table(out, "echo-v1")
    assert wide_table.port == 0
    assert set_headers(wide_table, "/only80") == {"x-header-set": "all"}
    assert "http_routes/demo/echo-v1:8080" not in out


@pytest.mark.parametrize(
    ("match_path", "replacement", "path", "expected"),
    [
        # mesh/httproute-rewrite-path
        ("/prefix/one", "/one", "/prefix/one/two", "/one/two"),
        ("/strip-prefix", "/", "/strip-prefix/three", "/three"),
        ("/strip-prefix", "/", "/strip-prefix", "/"),
        (
            "/prefix/rewrite-path-and-modify-headers",
            "/prefix",
            "/prefix/rewrite-path-and-modify-headers/one",
            "/prefix/one",
        ),
        # the Gateway API spec's ReplacePrefixMatch table
        ("/foo", "/xyz", "/foo/bar", "/xyz/bar"),
        ("/foo", "/xyz/", "/foo/bar", "/xyz/bar"),
        ("/foo/", "/xyz", "/foo/bar", "/xyz/bar"),
        ("/foo/", "/xyz/", "/foo/bar", "/xyz/bar"),
        ("/foo", "/xyz", "/foo", "/xyz"),
        ("/foo", "/xyz", "/foo/", "/xyz/"),
        ("/foo", "", "/foo/bar", "/bar"),
        ("/foo", "", "/foo/", "/"),
        ("/foo", "", "/foo", "/"),
        ("/foo", "/", "/foo/", "/"),
        ("/foo", "/", "/foo", "/"),
    ],
)
def test_rewrite_replace_prefix_match(
    match_path: str, replacement: str, path: str, expected: str
) -> None:
    rewrite = {
        "type": "URLRewrite",
        "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": replacement}},
    }
    out = run(
        *echo_services(),
        http_route("r", [rule(match(match_path), to=[backend("echo-v1", 80)], filters=[rewrite])]),
    )
    found = route(table(out), Request(path))
    assert found is not None
    assert rewritten_path(found, Request(path)) == expected
    assert route(table(out), Request(match_path.rstrip("/") + "x")) is None


def test_rewrite_full_path_and_hostname() -> None:
    rewrite = {
        "type": "URLRewrite",
        "urlRewrite": {
            "hostname": "one.example.org",
            "path": {"type": "ReplaceFullPath", "replaceFullPath": "/one"},
        },
    }
    out = run(
        *echo_services(),
        http_route("r", [rule(match("/full/one"), to=[backend("echo-v1", 80)], filters=[rewrite])]),
    )
    found = route(table(out), Request("/full/one/two"))
    assert found is not None and rewritten_path(found, Request("/full/one/two")) == "/one"
    assert found.rewrite.hostname == "one.example.org"


@pytest.mark.parametrize(
    ("redirect", "path", "status", "location"),
    [
        # mesh/httproute-redirect-path, -host-and-status, -port, -scheme: 302 unless set
        (
            {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"}},
            "/original-prefix/lemon",
            302,
            (None, "/replacement-prefix/lemon"),
        ),
        (
            {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/full-path-replacement"}},
            "/original-prefix/path/original",
            302,
            (None, "/full-path-replacement"),
        ),
        (
            {
                "hostname": "example.org",
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"},
            },
            "/original-prefix",
            302,
            ("example.org", "/replacement-prefix"),
        ),
        (
            {
                "statusCode": 301,
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"},
            },
            "/original-prefix",
            301,
            (None, "/replacement-prefix"),
        ),
        (
            {"hostname": "example.org"},
            "/original-prefix/x",
            302,
            ("example.org", "/original-prefix/x"),
        ),
    ],
)
def test_redirect(
    redirect: dict[str, Any], path: str, status: int, location: tuple[str | None, str]
) -> None:
    filters = [{"type": "RequestRedirect", "requestRedirect": redirect}]
    out = run(*echo_services(), http_route("r", [rule(match("/original-prefix"), filters=filters)]))
    found = route(table(out), Request(path))
    assert found is not None and not found.backends and not found.direct_status
    assert found.redirect.status_code == status
    assert (found.redirect.hostname or None, rewritten_path(found, Request(path))) == location


def test_redirect_port_and_scheme() -> None:
    filters = [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "port": 8443}}]
    found = route(
        table(run(*echo_services(), http_route("r", [rule(filters=filters)]))), Request("/x")
    )
    assert found is not None
    assert (found.redirect.scheme, found.redirect.port, found.redirect.status_code) == (
        "https",
        8443,
        302,
    )


def test_weights_and_backend_validity() -> None:
    """mesh/httproute-weight 70/30; weight 0 gets nothing; a missing Service keeps its share
    as an invalid backend (answered 500); no valid backend at all: the rule answers 500."""
    rules = [
        rule(
            match("/split"),
            to=[
                backend("echo-v1", weight=70),
                backend("echo-v2", weight=30),
                backend("echo-v3", weight=0),
            ],
        ),
        rule(match("/missing"), to=[backend("echo-v1", weight=1), backend("nope", weight=1)]),
        rule(match("/zero"), to=[backend("echo-v1", weight=0)]),
        rule(match("/none"), to=[backend("nope")]),
        rule(match("/empty")),
    ]
    out = run(*echo_services(), http_route("r", rules))
    split = route(table(out), Request("/split"))
    assert split is not None
    assert [(b.service, b.port, b.weight) for b in split.backends] == [
        ("echo-v1.demo.svc.cluster.local", 8080, 70),
        ("echo-v2.demo.svc.cluster.local", 8080, 30),
    ]
    missing = route(table(out), Request("/missing"))
    assert missing is not None and backend_names(missing) == ["echo-v1", "!"]
    assert [b.weight for b in missing.backends] == [1, 1]
    for path in ("/zero", "/none", "/empty"):
        found = route(table(out), Request(path))
        assert found is not None and found.direct_status == 500 and not found.backends


def test_header_modifiers_mirror_timeouts_and_default_retry() -> None:
    filters = [
        {
            "type": "RequestHeaderModifier",
            "requestHeaderModifier": {
                "set": [{"name": "X-Header-Set", "value": "s"}],
                "add": [{"name": "X-Header-Add", "value": "a"}],
                "remove": ["X-Header-Remove"],
            },
        },
        {
            "type": "RequestMirror",
            "requestMirror": {"backendRef": {"name": "echo-v2", "port": 8080}, "percent": 25},
        },
    ]
    per_backend = [
        {
            "type": "ResponseHeaderModifier",
            "responseHeaderModifier": {"add": [{"name": "X-Backend", "value": "v1"}]},
        }
    ]
    rules = [
        rule(
            match("/m"),
            to=[backend("echo-v1", filters=per_backend)],
            filters=filters,
            timeouts={"request": "500ms", "backendRequest": "100ms"},
        ),
        rule(match("/off"), to=[backend("echo-v1")], timeouts={"request": "0s"}),
    ]
    out = run(*echo_services(), http_route("r", rules))
    found = route(table(out), Request("/m"))
    assert found is not None
    assert dict(found.request_headers.set) == {"x-header-set": "s"}
    assert dict(found.request_headers.add) == {"x-header-add": "a"}
    assert list(found.request_headers.remove) == ["x-header-remove"]
    assert [(m.backend.service, m.backend.port, m.percent) for m in found.mirrors] == [
        ("echo-v2.demo.svc.cluster.local", 8080, 25.0)
    ]
    assert dict(found.backends[0].response_headers.add) == {"x-backend": "v1"}
    assert found.timeout_seconds == pytest.approx(0.5)
    assert found.retry.per_try_timeout_seconds == pytest.approx(0.1)
    assert found.retry.attempts == 2 and list(found.retry.retriable_status_codes) == []
    off = route(table(out), Request("/off"))
    assert off is not None and off.timeout_seconds == 0


def test_consumer_route_applies_to_its_namespace_only() -> None:
    """mesh-consumer-route: a route in the client's namespace for a Service elsewhere is
    used by that namespace's clients only, ahead of (and instead of) producer routes."""
    set_header = [
        {
            "type": "ResponseHeaderModifier",
            "responseHeaderModifier": {"set": [{"name": "X-Header-Set", "value": "set"}]},
        }
    ]
    out = run(
        *echo_services("producer"),
        http_route(
            "producer-route",
            [rule(match("/p"), to=[backend("echo-v2")])],
            parent="echo-v1",
            ns="producer",
        ),
        http_route(
            "consumer-route",
            [
                rule(
                    match("/c"),
                    to=[backend("echo-v1", 80, namespace="producer")],
                    filters=set_header,
                )
            ],
            parent="echo-v1",
            ns="consumer",
            parent_ns="producer",
        ),
    )
    routes = table(out, "echo-v1", ns="producer")
    consumer = route(routes, Request("/c", source_namespace="consumer"))
    assert consumer is not None and dict(consumer.response_headers.set) == {"x-header-set": "set"}
    assert backend_names(consumer) == ["echo-v1"]
    assert consumer.backends[0].service == "echo-v1.producer.svc.cluster.local"
    missed = route(routes, Request("/p", source_namespace="consumer"))
    assert missed is not None and missed.direct_status == 404
    producer = route(routes, Request("/p", source_namespace="producer"))
    assert producer is not None and backend_names(producer) == ["echo-v2"]
    assert route(routes, Request("/c", source_namespace="producer")) is None


def test_backend_in_a_third_namespace_needs_a_reference_grant() -> None:
    out = run(
        *echo_services(),
        service("elsewhere", "other"),
        http_route("r", [rule(to=[backend("elsewhere", namespace="other")])]),
    )
    found = route(table(out), Request("/"))
    assert found is not None and found.direct_status == 500 and not found.backends


def test_gateway_parents_and_missing_services_are_not_attached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    to_gateway = http_route("gw", [rule(to=[backend("echo-v1")])])
    to_gateway["spec"]["parentRefs"] = [{"name": "ingress"}]
    with caplog.at_level(logging.WARNING):
        out = run(
            *echo_services(),
            to_gateway,
            http_route("lost", [rule(to=[backend("echo-v1")])], parent="gone"),
        )
    assert not [k for k in out if k.startswith("http_routes/")]
    assert "HTTPRoute demo/lost" in caplog.text and "no Service demo/'gone'" in caplog.text


@pytest.mark.parametrize(
    ("rules", "field", "problem"),
    [
        ([rule(match("foo"))], "spec.rules[0].matches[0].path.value", "must start with /"),
        ([rule(match("/a", "Glob"))], "spec.rules[0].matches[0].path.type", "'Glob' is not one of"),
        (
            [rule(match("/(", "RegularExpression"))],
            "spec.rules[0].matches[0].path.value",
            "not a valid regular expression",
        ),
        ([rule(match(method="FETCH"))], "spec.rules[0].matches[0].method", "'FETCH' is not one of"),
        (
            [rule(to=[backend("echo-v1", weight=-1)])],
            "spec.rules[0].backendRefs[0].weight",
            "-1 is not an integer",
        ),
        ([rule(to=[{"name": "echo-v1"}])], "spec.rules[0].backendRefs[0].port", "is required"),
        (
            [rule(to=[backend("echo-v1")], timeouts={"request": "10"})],
            "spec.rules[0].timeouts.request",
            "'10' is not a duration",
        ),
        (
            [rule(to=[backend("echo-v1")], timeouts={"request": "1s", "backendRequest": "2s"})],
            "spec.rules[0].timeouts.backendRequest",
            "must not be longer than request",
        ),
        (
            [
                rule(
                    match("/a", "Exact"),
                    filters=[
                        {
                            "type": "URLRewrite",
                            "urlRewrite": {
                                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}
                            },
                        }
                    ],
                )
            ],
            "spec.rules[0].matches[0].path.type",
            "needs a PathPrefix match",
        ),
        (
            [rule(filters=[{"type": "ExtensionRef", "extensionRef": {"name": "x"}}])],
            "spec.rules[0].filters[0].extensionRef",
            "is not supported",
        ),
        (
            [rule(filters=[{"type": "CORS", "cors": {"allowOrigins": ["example.com"]}}])],
            "spec.rules[0].filters[0].cors.allowOrigins[0]",
            "'example.com' is not * or scheme://host[:port]",
        ),
        (
            [rule(filters=[{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}}])],
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            "304 is not one of",
        ),
        ([rule(matchs=[])], "spec.rules[0].matchs", "unknown field"),
    ],
)
def test_malformed_httproute_is_an_error_naming_file_object_and_field(
    rules: list[dict[str, Any]], field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as error:
        run(*echo_services(), http_route("bad", rules))
    assert f"cfg.yaml#5: HTTPRoute demo/bad: {field}: " in str(error.value)
    assert problem in str(error.value)


def test_service_port_by_section_name() -> None:
    route_obj = http_route("r", [rule(to=[backend("echo-v1")])])
    route_obj["spec"]["parentRefs"][0]["sectionName"] = "http-8080"
    out = run(*echo_services(), route_obj)
    assert table(out, port=8080).port == 8080
    route_obj["spec"]["parentRefs"][0]["sectionName"] = "grpc"
    with pytest.raises(
        ConfigError, match="sectionName: Service demo/echo has no port named 'grpc'"
    ):
        run(*echo_services(), route_obj)


def test_other_services_are_untouched() -> None:
    out = run(service("lonely"), *echo_services(), http_route("r", [rule(to=[backend("echo-v1")])]))
    assert "http_routes/demo/lonely" not in out


def test_cors_filter() -> None:
    cors = {
        "allowOrigins": ["https://app.example", "https://*.example.org", "*"],
        "allowMethods": ["GET"],
        "allowCredentials": True,
    }
    out = run(*echo_services(), http_route("r", [rule(filters=[{"type": "CORS", "cors": cors}])]))
    found = route(table(out), Request("/x"))
    assert found is not None
    origins = found.cors.allow_origins
    assert origins[0].exact == "https://app.example"
    assert re.fullmatch(origins[1].regex, "https://a.b.example.org")
    assert not re.fullmatch(origins[1].regex, "https://example.org")
    assert origins[2].regex == ".*"
    assert (list(found.cors.allow_methods), found.cors.max_age_seconds) == (["GET"], 5)
    assert found.cors.allow_credentials
