"""Waypoints from Gateways, use-waypoint resolution, RateLimit, L7 AuthorizationPolicy and the
bypass protection policy."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from controller.translate import ConfigError
from mesh.api import mesh_pb2
from tests.unit.l7_objects import gateway, namespace, pod, run, service

GW_LABEL = "gateway.networking.k8s.io/gateway-name"


def waypoint_pods(name: str = "waypoint", sa: str = "waypoint", n: int = 2) -> list[dict[str, Any]]:
    return [pod(f"{name}-{i}", labels={GW_LABEL: name}, sa=sa) for i in range(n)]


def test_gateway_of_waypoint_class_declares_a_waypoint_served_by_its_pods() -> None:
    pods = waypoint_pods()
    out = run(namespace("demo", {"istio.io/dataplane-mode": "ambient"}), gateway("waypoint"), *pods)
    wp = out["waypoint/demo/waypoint"].waypoint
    assert list(wp.addresses) == [p["status"]["podIP"] for p in pods]
    assert (wp.service_account, wp.trust_domain, wp.hbone_port, wp.traffic_type) == (
        "waypoint",
        "cluster.local",
        15008,
        "service",
    )
    # Waypoint pods are never enrolled, whatever their namespace says.
    assert not out["workload/demo/waypoint-0"].workload.ambient


@pytest.mark.parametrize(
    "api_version", ["gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1"]
)
def test_gateway_api_versions_and_classes(api_version: str) -> None:
    ours = gateway("ours", cls="ambimesh-waypoint", waypoint_for="all") | {
        "apiVersion": api_version
    }
    ingress = gateway("ingress", cls="istio")
    out = run(
        ours,
        ingress,
        pod("ingress-0", labels={GW_LABEL: "ingress", "istio.io/dataplane-mode": "ambient"}),
    )
    assert out["waypoint/demo/ours"].waypoint.traffic_type == "all"
    assert out["waypoint/demo/ours"].waypoint.service_account == "ours", (
        "no pods yet: the Gateway's name"
    )
    assert "waypoint/demo/ingress" not in out
    assert out["workload/demo/ingress-0"].workload.ambient, "only waypoint pods are kept out"


def test_waypoint_pods_with_different_service_accounts_are_an_error() -> None:
    with pytest.raises(
        ConfigError,
        match=r"Gateway demo/waypoint: metadata.name: its pods run as different service accounts",
    ):
        run(
            gateway("waypoint"),
            pod("a", labels={GW_LABEL: "waypoint"}, sa="one"),
            pod("b", labels={GW_LABEL: "waypoint"}, sa="two"),
        )


def test_bad_waypoint_for_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"metadata.labels\[istio.io/waypoint-for\]: 'everything' is not one of"
    ):
        run(gateway("waypoint", waypoint_for="everything"))


@pytest.mark.parametrize(
    ("ns_labels", "svc_labels", "expected"),
    [
        ({}, {}, ""),
        ({"istio.io/use-waypoint": "waypoint"}, {}, "demo/waypoint"),
        ({"istio.io/use-waypoint": "waypoint"}, {"istio.io/use-waypoint": "none"}, ""),
        ({}, {"ambimesh.io/use-waypoint": "waypoint"}, "demo/waypoint"),
        (
            {"istio.io/use-waypoint": "other"},
            {"ambimesh.io/use-waypoint": "waypoint"},
            "demo/waypoint",
        ),
        (
            {},
            {"istio.io/use-waypoint": "shared", "istio.io/use-waypoint-namespace": "infra"},
            "infra/shared",
        ),
        (
            {"ambimesh.io/use-waypoint": "shared", "ambimesh.io/use-waypoint-namespace": "infra"},
            {},
            "infra/shared",
        ),
        ({}, {"istio.io/use-waypoint": "missing"}, ""),
        ({}, {"istio.io/use-waypoint": "workload-only"}, ""),
    ],
)
def test_service_waypoint_resolution(
    ns_labels: dict[str, str], svc_labels: dict[str, str], expected: str
) -> None:
    out = run(
        namespace("demo", ns_labels),
        gateway("waypoint"),
        gateway("other"),
        gateway("shared", "infra"),
        gateway("workload-only", waypoint_for="workload"),
        service("reviews", labels=svc_labels),
    )
    assert out["service/demo/reviews"].service.waypoint == expected


def test_missing_waypoint_is_a_warning_naming_the_object(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        out = run(service("reviews", labels={"istio.io/use-waypoint": "ghost"}))
    assert out["service/demo/reviews"].service.waypoint == ""
    assert (
        "Service demo/reviews: label istio.io/use-waypoint: no waypoint Gateway demo/'ghost'"
        in caplog.text
    )


@pytest.mark.parametrize(
    ("waypoint_for", "expected"), [("service", ""), ("workload", "demo/wp"), ("all", "demo/wp")]
)
def test_pod_uses_a_waypoint_only_when_it_takes_workload_traffic(
    waypoint_for: str, expected: str
) -> None:
    out = run(
        namespace("demo", {"istio.io/use-waypoint": "wp"}),
        gateway("wp", waypoint_for=waypoint_for),
        pod("app"),
        *waypoint_pods("wp", "wp", 1),
    )
    assert out["workload/demo/app"].workload.waypoint == expected
    assert out["workload/demo/wp-0"].workload.waypoint == "", "a waypoint never uses a waypoint"


RATE_LIMIT: dict[str, Any] = {
    "apiVersion": "ambimesh.io/v1alpha1",
    "kind": "RateLimit",
    "metadata": {"name": "reviews-limit", "namespace": "demo"},
    "spec": {"targetRef": {"kind": "Service", "name": "reviews"}, "requests": 100, "per": "1m"},
}


def test_rate_limit() -> None:
    limit = run(service("reviews"), RATE_LIMIT)["rate_limit/demo/reviews-limit"].rate_limit
    assert (limit.service, limit.requests, limit.per_seconds, limit.burst) == (
        "reviews.demo.svc.cluster.local",
        100,
        60.0,
        100,
    )
    burst = RATE_LIMIT | {"spec": RATE_LIMIT["spec"] | {"burst": 20}}
    assert run(service("reviews"), burst)["rate_limit/demo/reviews-limit"].rate_limit.burst == 20
    assert "rate_limit/demo/reviews-limit" not in run(RATE_LIMIT)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"requests": 0}, "spec.requests: 0 is not an integer from 1"),
        ({"per": "0s"}, "spec.per: is required (a duration above 0"),
        ({"per": "fast"}, "spec.per: 'fast' is not a duration"),
        (
            {"targetRef": {"kind": "Deployment", "name": "x"}},
            "spec.targetRef.kind: must be Service",
        ),
        ({"burst": -1}, "spec.burst: -1 is not an integer"),
    ],
)
def test_bad_rate_limit(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        run(service("reviews"), RATE_LIMIT | {"spec": RATE_LIMIT["spec"] | spec})
    assert f"cfg.yaml#2: RateLimit demo/reviews-limit: {problem}" in str(error.value)


def policy(spec: dict[str, Any], name: str = "viewer") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": spec,
    }


MESH = [
    gateway("waypoint"),
    *waypoint_pods(),
    service("reviews", labels={"istio.io/use-waypoint": "waypoint"}),
    service("direct"),
]


def test_l7_policy_is_translated_for_the_waypoint_and_pods_admit_only_the_waypoint() -> None:
    spec = {
        "targetRefs": [
            {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
        ],
        "action": "ALLOW",
        "rules": [
            {
                "from": [
                    {
                        "source": {
                            "principals": ["cluster.local/ns/demo/sa/productpage"],
                            "namespaces": ["demo"],
                        }
                    }
                ],
                "to": [
                    {
                        "operation": {
                            "methods": ["GET"],
                            "paths": ["/api/*", "/health"],
                            "hosts": ["reviews*"],
                            "ports": ["9080"],
                        }
                    }
                ],
                "when": [
                    {"key": "request.headers[X-Version]", "values": ["v1", "v2"]},
                    {"key": "source.ip", "values": ["10.0.0.0/8"]},
                ],
            }
        ],
    }
    out = run(*MESH, policy(spec))
    assert "authorization_policy/demo/viewer" not in out, "targetRefs: not ztunnel's"
    http = out["http_authorization_policy/demo/viewer"].http_authorization_policy
    assert (list(http.target_refs), http.action) == (
        ["Gateway/demo/waypoint"],
        mesh_pb2.AuthorizationPolicy.ALLOW,
    )
    to, source, header, ip = (clause.matches[0] for clause in http.rules[0].clauses)
    assert [m.exact for m in to.methods] == ["GET"]
    assert [(m.prefix, m.exact) for m in to.paths] == [("/api/", ""), ("", "/health")]
    assert [m.prefix for m in to.hosts] == ["reviews"] and list(to.ports) == [9080]
    assert [m.exact for m in source.principals] == ["cluster.local/ns/demo/sa/productpage"]
    assert [m.exact for m in header.headers["x-version"].matches] == ["v1", "v2"]
    assert list(ip.source_cidrs) == ["10.0.0.0/8"]
    bypass = out["authorization_policy/demo/waypoint-only-reviews"].authorization_policy
    assert (bypass.scope, dict(bypass.selector), bypass.action) == (
        mesh_pb2.WORKLOAD,
        {"app": "reviews"},
        mesh_pb2.AuthorizationPolicy.ALLOW,
    )
    assert [m.exact for m in bypass.rules[0].clauses[0].matches[0].principals] == [
        "cluster.local/ns/demo/sa/waypoint"
    ]
    assert "authorization_policy/demo/waypoint-only-direct" not in out, (
        "no waypoint, no bypass policy"
    )


def test_service_target_deny_policy_protects_that_service_only() -> None:
    spec = {
        "targetRef": {"kind": "Service", "group": "", "name": "reviews"},
        "action": "DENY",
        "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}],
    }
    other = service("ratings", labels={"istio.io/use-waypoint": "waypoint"})
    out = run(*MESH, other, policy(spec))
    assert list(
        out["http_authorization_policy/demo/viewer"].http_authorization_policy.target_refs
    ) == ["Service/demo/reviews"]
    assert "authorization_policy/demo/waypoint-only-reviews" in out
    assert "authorization_policy/demo/waypoint-only-ratings" not in out


def test_audit_policy_needs_no_bypass_protection() -> None:
    spec = {
        "targetRefs": [{"kind": "Service", "name": "reviews"}],
        "action": "AUDIT",
        "rules": [{}],
    }
    out = run(*MESH, policy(spec))
    assert "http_authorization_policy/demo/viewer" in out
    assert "authorization_policy/demo/waypoint-only-reviews" not in out


def test_unsupported_attributes_drop_allow_rules_and_deny_conditions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rules = [
        {
            "from": [{"source": {"requestPrincipals": ["*"]}}],
            "to": [{"operation": {"methods": ["GET"]}}],
        }
    ]
    target = {"targetRefs": [{"kind": "Service", "name": "reviews"}]}
    with caplog.at_level(logging.WARNING):
        allow = run(*MESH, policy({**target, "rules": rules}))[
            "http_authorization_policy/demo/viewer"
        ]
        deny = run(*MESH, policy({**target, "action": "DENY", "rules": rules}))[
            "http_authorization_policy/demo/viewer"
        ]
    assert not allow.http_authorization_policy.rules, (
        "an ALLOW rule the waypoint cannot check never allows"
    )
    deny_rule = deny.http_authorization_policy.rules[0]
    assert [m.exact for m in deny_rule.clauses[0].matches[0].methods] == ["GET"]
    assert not deny_rule.clauses[1].matches[0].ListFields(), "only the unseen condition is dropped"
    assert "the waypoint does not check requestPrincipals" in caplog.text


def test_user_policy_with_the_generated_name_is_an_error() -> None:
    spec = {"targetRefs": [{"kind": "Service", "name": "reviews"}], "rules": [{}]}
    squatter = policy({"action": "ALLOW", "rules": [{}]}, name="waypoint-only-reviews")
    with pytest.raises(
        ConfigError,
        match="authorization_policy/demo/waypoint-only-reviews: generated to keep callers",
    ):
        run(*MESH, policy(spec), squatter)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (
            {"targetRefs": [{"kind": "Deployment", "name": "x"}]},
            "spec.targetRefs[0].kind: 'Deployment' (group '')",
        ),
        (
            {"targetRefs": [{"kind": "Service", "name": "x", "namespace": "other"}]},
            "spec.targetRefs[0].namespace: must be the policy's own namespace",
        ),
        (
            {
                "targetRefs": [{"kind": "Service", "name": "x"}],
                "rules": [{"when": [{"key": "request.headers[]", "values": ["a"]}]}],
            },
            "spec.rules[0].when[0].key: 'request.headers[]' names no header",
        ),
        (
            {
                "targetRefs": [{"kind": "Service", "name": "x"}],
                "rules": [{"to": [{"operation": {"verbs": ["GET"]}}]}],
            },
            "spec.rules[0].to[0].operation.verbs: unknown field",
        ),
    ],
)
def test_bad_l7_policy(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        run(*MESH, policy(spec))
    assert f"AuthorizationPolicy demo/viewer: {problem}" in str(error.value)
