"""VirtualService + DestinationRule -> route tables and destination policies."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import yaml

from controller.translate import ConfigError
from mesh.api import mesh_pb2
from tests.unit.l7_objects import backend, http_route, rule, run, service, table
from tests.unit.route_oracle import Request, backend_names, rewritten_path, route

# The seed's canary (shared/seeds/service-mesh-patterns.md), verbatim: no namespace, no hosts.
SEED = """\
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: my-service
spec:
  http:
  - route:
    - destination:
        host: my-service
        subset: v1
      weight: 90
    - destination:
        host: my-service
        subset: v2
      weight: 10
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: my-service
spec:
  host: my-service
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"""


def test_seed_canary_translates_unchanged() -> None:
    out = run(service("my-service", "default"), *yaml.safe_load_all(SEED))
    routes = table(out, "my-service", ns="default")
    assert routes.service == "my-service.default.svc.cluster.local" and routes.port == 0
    found = route(routes, Request("/anything", "POST"))
    assert found is not None
    assert [(b.service, b.subset, dict(b.subset_labels), b.weight) for b in found.backends] == [
        ("my-service.default.svc.cluster.local", "v1", {"version": "v1"}, 90),
        ("my-service.default.svc.cluster.local", "v2", {"version": "v2"}, 10),
    ]
    # Istio's default retry policy, since the VirtualService says nothing about retries;
    # an application's 503 is not retried (Istio >= 1.24).
    assert found.retry.attempts == 2
    assert list(found.retry.retry_on) == [
        "connect-failure",
        "refused-stream",
        "unavailable",
        "cancelled",
    ]
    assert list(found.retry.retriable_status_codes) == []
    policy = out["destination_policy/default/my-service"].destination_policy
    assert policy.service == "my-service.default.svc.cluster.local"
    assert {s.name: dict(s.labels) for s in policy.subsets} == {
        "v1": {"version": "v1"},
        "v2": {"version": "v2"},
    }


def vs(
    http: list[dict[str, Any]], name: str = "vs", hosts: list[str] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "demo", **spec.pop("metadata", {})},
        "spec": {"hosts": hosts or ["reviews"], "http": http, **spec},
    }


def dr(spec: dict[str, Any], name: str = "dr", **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "DestinationRule",
        "metadata": {"name": name, "namespace": "demo", **metadata},
        "spec": {"host": "reviews", **spec},
    }


def to(
    host: str = "reviews", subset: str | None = None, weight: int | None = None, **extra: Any
) -> dict[str, Any]:
    destination: dict[str, Any] = {"host": host}
    if subset:
        destination["subset"] = subset
    out: dict[str, Any] = {"destination": destination, **extra}
    if weight is not None:
        out["weight"] = weight
    return out


SUBSETS = dr({"subsets": [{"name": n, "labels": {"version": n}} for n in ("v1", "v2", "v3")]})
SERVICES = [service("reviews"), service("ratings")]


def routes_of(*objects: dict[str, Any]) -> mesh_pb2.HttpRouteTable:
    return table(run(*SERVICES, SUBSETS, *objects), "reviews")


def test_rules_keep_their_order_first_match_wins_and_no_match_matches_all() -> None:
    routes = routes_of(
        vs(
            [
                {
                    "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                    "route": [to(subset="v2")],
                },
                {
                    "match": [{"uri": {"prefix": "/reviews"}, "method": {"exact": "get"}}],
                    "route": [to(subset="v3")],
                },
                {
                    "match": [
                        {"uri": {"regex": "/r[0-9]+"}},
                        {"queryParams": {"q": {"exact": "1"}}},
                    ],
                    "route": [to("ratings")],
                },
                {"route": [to(subset="v1")]},
            ]
        )
    )
    cases = [
        (Request("/reviews", headers={"End-User": "jason"}), ["reviews:v2"]),
        (Request("/reviewsX"), ["reviews:v3"]),  # Istio prefix: a plain string prefix
        (Request("/reviews", "POST"), ["reviews:v1"]),
        (Request("/r42"), ["ratings"]),
        (Request("/r42x"), ["reviews:v1"]),
        (Request("/x", query={"q": "1"}), ["ratings"]),
        (Request("/x"), ["reviews:v1"]),
    ]
    for request, expected in cases:
        found = route(routes, request)
        assert found is not None and backend_names(found) == expected, request
    assert [r.name for r in routes.rules] == [f"VirtualService/demo/vs#{i}" for i in range(4)]


def test_match_attributes() -> None:
    routes = routes_of(
        vs(
            [
                {
                    "match": [
                        {
                            "port": 9080,
                            "sourceLabels": {"app": "productpage"},
                            "sourceNamespace": "front",
                            "withoutHeaders": {"x-skip": {}},
                            "gateways": ["mesh"],
                        },
                        {"gateways": ["ingress"], "uri": {"exact": "/never"}},
                    ],
                    "route": [to(subset="v2")],
                },
                {"route": [to(subset="v1")]},
            ]
        )
    )
    first = routes.rules[0]
    assert len(first.matches) == 1, "the match for another gateway is dropped"
    m = first.matches[0]
    assert (m.port, dict(m.source_labels), m.source_namespace) == (
        9080,
        {"app": "productpage"},
        "front",
    )
    assert [(h.name, h.invert) for h in m.headers] == [("x-skip", True)]
    assert (
        route(routes, Request(port=9080, source_namespace="front", headers={"x-skip": "1"}))
        == routes.rules[1]
    )


def test_route_actions_and_policies() -> None:
    http = [
        {
            "match": [{"uri": {"prefix": "/v1/api"}}, {"uri": {"exact": "/old"}}],
            "rewrite": {"uri": "/api", "authority": "internal"},
            "route": [
                to(subset="v2", weight=75, headers={"request": {"set": {"X-Sub": "v2"}}}),
                to(subset="v1", weight=25),
                to(subset="v3", weight=0),
            ],
            "timeout": "1.5s",
            "retries": {
                "attempts": 3,
                "perTryTimeout": "500ms",
                "retryOn": "5xx,gateway-error,429",
            },
            "fault": {
                "delay": {"fixedDelay": "100ms", "percentage": {"value": 10}},
                "abort": {"httpStatus": 503, "percentage": {"value": 0.5}},
            },
            "mirror": {"host": "ratings"},
            "mirrorPercentage": {"value": 5},
            "headers": {
                "request": {"add": {"X-Add": "1"}, "remove": ["X-Drop"]},
                "response": {"set": {"X-Resp": "r"}},
            },
        },
        {
            "match": [{"uri": {"prefix": "/moved"}}],
            "redirect": {"uri": "/new", "authority": "elsewhere", "redirectCode": 308},
        },
        {
            "match": [{"uri": {"exact": "/teapot"}}],
            "directResponse": {"status": 418, "body": {"string": "short and stout"}},
        },
        {"match": [{"uri": {"exact": "/noretry"}}], "route": [to()], "retries": {"attempts": 0}},
    ]
    routes = routes_of(vs(http))
    prefixed = route(routes, Request("/v1/api/x"))
    exact = route(routes, Request("/old"))
    assert prefixed is not None and exact is not None and prefixed is not exact
    assert rewritten_path(prefixed, Request("/v1/api/x")) == "/api/x"
    assert rewritten_path(exact, Request("/old")) == "/api"
    assert prefixed.rewrite.hostname == "internal"
    assert [(b.subset, b.weight) for b in prefixed.backends] == [("v2", 75), ("v1", 25)]
    assert dict(prefixed.backends[0].request_headers.set) == {"x-sub": "v2"}
    assert prefixed.timeout_seconds == pytest.approx(1.5)
    retry = prefixed.retry
    assert (retry.attempts, retry.per_try_timeout_seconds) == (3, 0.5)
    assert list(retry.retry_on) == ["5xx", "gateway-error", "retriable-status-codes"]
    assert list(retry.retriable_status_codes) == [429]
    fault = prefixed.fault
    assert (
        round(fault.delay_seconds, 6),
        fault.delay_percent,
        fault.abort_status,
        fault.abort_percent,
    ) == (
        0.1,
        10.0,
        503,
        0.5,
    )
    assert [(m.backend.service, m.percent) for m in prefixed.mirrors] == [
        ("ratings.demo.svc.cluster.local", 5.0)
    ]
    assert dict(prefixed.request_headers.add) == {"x-add": "1"} and list(
        prefixed.request_headers.remove
    ) == ["x-drop"]
    assert dict(prefixed.response_headers.set) == {"x-resp": "r"}
    moved = route(routes, Request("/moved/x"))
    assert moved is not None and (
        moved.redirect.path,
        moved.redirect.hostname,
        moved.redirect.status_code,
    ) == ("/new", "elsewhere", 308)
    teapot = route(routes, Request("/teapot"))
    assert teapot is not None and (teapot.direct_status, teapot.direct_body) == (
        418,
        "short and stout",
    )
    noretry = route(routes, Request("/noretry"))
    assert noretry is not None and noretry.retry.attempts == 0


@pytest.mark.parametrize(
    "host", ["reviews", "reviews.demo", "reviews.demo.svc", "reviews.demo.svc.cluster.local"]
)
def test_host_spellings_name_the_service(host: str) -> None:
    assert (
        routes_of(vs([{"route": [to(host)]}], hosts=[host])).rules[0].backends[0].service
        == "reviews.demo.svc.cluster.local"
    )


def test_unknown_destinations_are_invalid_backends_and_gateway_only_vs_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        routes = routes_of(vs([{"route": [to(subset="v9", weight=50), to("nowhere", weight=50)]}]))
    assert backend_names(routes.rules[0]) == ["!:v9", "!"]
    assert "no DestinationRule of reviews defines subset 'v9'" in caplog.text
    out = run(*SERVICES, vs([{"route": [to()]}], gateways=["istio-system/ingress"]))
    assert not [k for k in out if k.startswith("http_routes/")]


def test_oldest_virtual_service_wins_and_httproute_beats_virtual_service(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = vs(
        [{"route": [to(subset="v1")]}],
        name="old",
        metadata={"creationTimestamp": "2024-01-01T00:00:00Z"},
    )
    new = vs(
        [{"route": [to(subset="v2")]}],
        name="new",
        metadata={"creationTimestamp": "2025-01-01T00:00:00Z"},
    )
    with caplog.at_level(logging.WARNING):
        routes = routes_of(new, old)
    assert backend_names(routes.rules[0]) == ["reviews:v1"] and list(routes.sources) == [
        "VirtualService demo/old"
    ]
    assert (
        "VirtualService demo/new ignored for Service demo/reviews: the older VirtualService wins"
        in caplog.text
    )
    gamma = http_route("gamma", [rule(to=[backend("ratings")])], parent="reviews")
    routes = routes_of(old, gamma)
    assert list(routes.sources) == ["HTTPRoute demo/gamma"]


def test_destination_policy_with_subset_overrides() -> None:
    policy_spec = {
        "trafficPolicy": {
            "loadBalancer": {"simple": "LEAST_CONN"},
            "connectionPool": {
                "tcp": {"maxConnections": 100, "connectTimeout": "30ms"},
                "http": {
                    "http1MaxPendingRequests": 10,
                    "http2MaxRequests": 1000,
                    "maxRetries": 3,
                    "maxRequestsPerConnection": 1,
                },
            },
            "outlierDetection": {
                "consecutive5xxErrors": 7,
                "interval": "1m",
                "baseEjectionTime": "15m",
                "maxEjectionPercent": 50,
            },
        },
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {
                "name": "v2",
                "labels": {"version": "v2"},
                "trafficPolicy": {
                    "loadBalancer": {"simple": "ROUND_ROBIN"},
                    "outlierDetection": {"consecutiveGatewayErrors": 2},
                },
            },
        ],
    }
    policy = run(*SERVICES, dr(policy_spec))["destination_policy/demo/dr"].destination_policy
    top = policy.policy
    assert top.load_balancer == mesh_pb2.LEAST_REQUEST
    pool = top.connection_pool
    assert (
        pool.max_connections,
        round(pool.connect_timeout_seconds, 6),
        pool.max_pending_requests,
    ) == (
        100,
        0.03,
        10,
    )
    assert (pool.max_requests, pool.max_retries, pool.max_requests_per_connection) == (1000, 3, 1)
    outlier = top.outlier_detection
    assert (
        outlier.consecutive_5xx_errors,
        outlier.interval_seconds,
        outlier.base_ejection_seconds,
        outlier.max_ejection_percent,
    ) == (7, 60.0, 900.0, 50)
    v1, v2 = policy.subsets
    assert v1.policy == top
    assert v2.policy.load_balancer == mesh_pb2.ROUND_ROBIN
    assert v2.policy.connection_pool == pool, "sections the subset does not set are inherited"
    # The subset's outlierDetection replaces the whole section, with Istio's defaults.
    assert (
        v2.policy.outlier_detection.consecutive_gateway_errors,
        v2.policy.outlier_detection.consecutive_5xx_errors,
    ) == (2, 5)
    assert (
        v2.policy.outlier_detection.interval_seconds,
        v2.policy.outlier_detection.max_ejection_percent,
    ) == (10.0, 10)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10s", 10.0), ("1.5s", 1.5), ("100ms", 0.1), ("1m", 60.0), ("1h", 3600.0), ("1m30s", 90.0)],
)
def test_durations(value: str, seconds: float) -> None:
    assert routes_of(vs([{"route": [to()], "timeout": value}])).rules[
        0
    ].timeout_seconds == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("obj", "field", "problem"),
    [
        (
            vs([{"route": [to()], "timeout": "10"}]),
            "spec.http[0].timeout",
            "'10' is not a duration",
        ),
        (vs([{"route": [to()], "timeout": "-1s"}]), "spec.http[0].timeout", "is not a duration"),
        (vs([{"route": [to()], "timeout": 5}]), "spec.http[0].timeout", "5 is not a duration"),
        (
            vs([{"route": [to()], "rewrite": {"uriRegexRewrite": {"match": "a", "rewrite": "b"}}}]),
            "spec.http[0].rewrite.uriRegexRewrite",
            "is not supported",
        ),
        (
            vs([{"route": [to()], "delegate": {"name": "x"}}]),
            "spec.http[0].delegate",
            "is not supported",
        ),
        (
            vs([{"match": [{"uri": {"exact": "/"}}]}]),
            "spec.http[0]",
            "needs one of route, redirect, directResponse",
        ),
        (
            vs([{"route": [to(weight=0), to(subset="v2", weight=0)]}]),
            "spec.http[0].route",
            "weights of all destinations are 0",
        ),
        (
            vs([{"route": [to()], "match": [{"uri": {"exact": "/", "prefix": "/"}}]}]),
            "spec.http[0].match[0].uri",
            "set only one of",
        ),
        (
            vs([{"route": [to()], "match": [{"uri": {"regex": "("}}]}]),
            "spec.http[0].match[0].uri.regex",
            "not a valid regular expression",
        ),
        (
            vs([{"route": [to()], "match": [{"authority": {"exact": "x"}}]}]),
            "spec.http[0].match[0].authority",
            "is not supported",
        ),
        (
            vs([{"route": [to()], "fault": {"abort": {"percentage": {"value": 5}}}}]),
            "spec.http[0].fault.abort.httpStatus",
            "is required",
        ),
        (
            vs([{"route": [to()], "retries": {"attempts": "3"}}]),
            "spec.http[0].retries.attempts",
            "'3' is not an integer",
        ),
        (
            vs([{"route": [to()], "corsPolicy": {"unmatchedPreflights": "DROP"}}]),
            "spec.http[0].corsPolicy.unmatchedPreflights",
            "is FORWARD or IGNORE, not 'DROP'",
        ),
        (
            vs([{"route": [to()], "corsPolicy": {"allowOrigins": [{"glob": "*"}]}}]),
            "spec.http[0].corsPolicy.allowOrigins[0].glob",
            "unknown field",
        ),
        (
            dr({"trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}}),
            "spec.trafficPolicy.loadBalancer.simple",
            "'FASTEST' is not one of",
        ),
        (
            dr({"trafficPolicy": {"outlierDetection": {"interval": "soon"}}}),
            "spec.trafficPolicy.outlierDetection.interval",
            "'soon' is not a duration",
        ),
        (
            dr({"subsets": [{"name": "a"}, {"name": "a"}]}),
            "spec.subsets[1].name",
            "'a' is defined twice",
        ),
        (
            dr({"subsets": [{"name": "a", "labels": {"version": 2}}]}),
            "spec.subsets[0].labels[version]",
            "values must be strings",
        ),
    ],
)
def test_malformed_istio_objects_are_errors_naming_file_object_and_field(
    obj: dict[str, Any], field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as error:
        run(*SERVICES, obj)
    assert f"cfg.yaml#3: {obj['kind']} demo/{obj['metadata']['name']}: {field}: " in str(
        error.value
    )
    assert problem in str(error.value)


def test_virtual_service_without_hosts_needs_one_destination_service() -> None:
    no_hosts = vs([{"route": [to("reviews", weight=50), to("ratings", weight=50)]}])
    del no_hosts["spec"]["hosts"]
    with pytest.raises(ConfigError, match=r"spec.hosts: is required \(the destinations"):
        run(*SERVICES, no_hosts)


def test_cors_policy() -> None:
    policy = {
        "allowOrigins": [{"exact": "https://a.example"}, {"regex": r"https://.*\.b\.example"}],
        "allowOrigin": ["https://legacy.example"],
        "allowMethods": ["GET", "POST"],
        "allowHeaders": ["x-token"],
        "exposeHeaders": ["x-trace"],
        "maxAge": "24h",
        "allowCredentials": True,
        "unmatchedPreflights": "IGNORE",
    }
    cors = routes_of(vs([{"route": [to()], "corsPolicy": policy}])).rules[0].cors
    assert [m.WhichOneof("kind") for m in cors.allow_origins] == ["exact", "regex", "exact"]
    assert cors.allow_origins[2].exact == "https://legacy.example"
    assert (list(cors.allow_methods), list(cors.allow_headers), list(cors.expose_headers)) == (
        ["GET", "POST"],
        ["x-token"],
        ["x-trace"],
    )
    assert (cors.max_age_seconds, cors.allow_credentials) == (86400, True)
    assert cors.ignore_unmatched_preflights
    plain = routes_of(vs([{"route": [to()], "corsPolicy": {"allowOrigin": ["*"]}}])).rules[0]
    assert plain.cors.allow_origins[0].regex == ".*"
    assert not plain.cors.ignore_unmatched_preflights
    assert not routes_of(vs([{"route": [to()]}])).rules[0].HasField("cors")
