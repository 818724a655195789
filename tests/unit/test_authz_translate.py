"""AuthorizationPolicy YAML -> the L4 policy ztunnel enforces (controller/authz.py), through
translate() as the controller calls it."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import yaml

from controller.translate import ConfigError, Settings, SourcedObject, translate
from mesh.api import mesh_pb2

Policy = mesh_pb2.AuthorizationPolicy
Match = mesh_pb2.AuthorizationMatch
S = mesh_pb2.StringMatch


def policy_doc(spec: Any, namespace: str = "demo", name: str = "p") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def run(*docs: dict[str, Any], settings: Settings | None = None) -> dict[str, Policy]:
    sourced = [SourcedObject(d, f"dir/authz.yaml#{i}") for i, d in enumerate(docs)]
    out = translate(sourced, settings)
    return {k: r.authorization_policy for k, r in out.items() if r.HasField("authorization_policy")}


def one(spec: Any, namespace: str = "demo") -> Policy:
    policies = run(policy_doc(spec, namespace))
    assert list(policies) == [f"authorization_policy/{namespace}/p"]
    return policies[f"authorization_policy/{namespace}/p"]


def test_istio_doc_example_unchanged_v1beta1() -> None:
    text = """\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: allow-sleep-to-httpbin
  namespace: ambient-demo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/ambient-demo/sa/sleep
"""
    (policy,) = run(yaml.safe_load(text)).values()
    assert policy.name == "allow-sleep-to-httpbin" and policy.namespace == "ambient-demo"
    assert policy.scope == mesh_pb2.WORKLOAD and dict(policy.selector) == {"app": "httpbin"}
    assert policy.action == Policy.ALLOW
    (rule,) = policy.rules
    (clause,) = rule.clauses
    assert list(clause.matches) == [
        Match(principals=[S(exact="cluster.local/ns/ambient-demo/sa/sleep")])
    ]


@pytest.mark.parametrize(
    ("namespace", "selector", "scope"),
    [
        ("demo", None, mesh_pb2.NAMESPACE),
        ("demo", {"matchLabels": {}}, mesh_pb2.NAMESPACE),  # empty matchLabels: no selector
        ("demo", {"matchLabels": {"app": "server"}}, mesh_pb2.WORKLOAD),
        ("istio-system", None, mesh_pb2.MESH),
        ("istio-system", {"matchLabels": {"app": "server"}}, mesh_pb2.MESH),
    ],
)
def test_scope(namespace: str, selector: dict[str, Any] | None, scope: int) -> None:
    spec: dict[str, Any] = {"action": "DENY", "rules": [{}]}
    if selector is not None:
        spec["selector"] = selector
    assert one(spec, namespace).scope == scope


def test_root_namespace_is_the_setting() -> None:
    settings = Settings(root_namespace="mesh-root")
    (policy,) = run(policy_doc({}, "mesh-root"), settings=settings).values()
    assert policy.scope == mesh_pb2.MESH
    (policy,) = run(policy_doc({}, "istio-system"), settings=settings).values()
    assert policy.scope == mesh_pb2.NAMESPACE


@pytest.mark.parametrize(
    ("spec", "action", "rules"),
    [
        ({}, Policy.ALLOW, 0),  # allow-nothing: an ALLOW without rules
        ({"action": "DENY", "rules": [{}]}, Policy.DENY, 1),  # deny-all
        ({"rules": [{}]}, Policy.ALLOW, 1),  # allow-all
        ({"action": "AUDIT", "rules": [{}]}, Policy.AUDIT, 1),
        ({"action": "deny", "rules": []}, Policy.DENY, 0),
    ],
)
def test_actions_and_rule_counts(spec: dict[str, Any], action: int, rules: int) -> None:
    policy = one(spec)
    assert policy.action == action
    assert len(policy.rules) == rules
    assert all(not r.clauses for r in policy.rules)  # a rule {} has no conditions


def test_source_fields() -> None:
    rule = {
        "from": [
            {
                "source": {
                    "principals": ["cluster.local/ns/demo/sa/client", "*", "cluster.local/*"],
                    "notPrincipals": ["*/sa/admin"],
                    "namespaces": ["demo"],
                    "notNamespaces": ["kube-*"],
                    "ipBlocks": ["10.0.0.0/8", "192.168.1.7"],
                    "notIpBlocks": ["10.1.2.3/16"],
                }
            },
            {"source": {"serviceAccounts": ["client", "other/robot"]}},
        ]
    }
    (clause,) = one({"rules": [rule]}).rules[0].clauses
    first, second = clause.matches
    assert first == Match(
        principals=[
            S(exact="cluster.local/ns/demo/sa/client"),
            S(presence=True),
            S(prefix="cluster.local/"),
        ],
        not_principals=[S(suffix="/sa/admin")],
        namespaces=[S(exact="demo")],
        not_namespaces=[S(prefix="kube-")],
        source_cidrs=["10.0.0.0/8", "192.168.1.7/32"],
        not_source_cidrs=["10.1.0.0/16"],
    )
    assert second == Match(
        principals=[S(suffix="/ns/demo/sa/client"), S(suffix="/ns/other/sa/robot")]
    )


def test_to_and_when_are_clauses_anded_with_from() -> None:
    rule = {
        "from": [{"source": {"namespaces": ["demo"]}}],
        "to": [{"operation": {"ports": ["8080", 9090]}}, {"operation": {"notPorts": ["22"]}}],
        "when": [
            {"key": "source.ip", "values": ["10.0.0.0/8"], "notValues": ["10.9.9.9"]},
            {"key": "source.principal", "values": ["cluster.local/ns/demo/*"]},
            {"key": "source.namespace", "notValues": ["legacy"]},
            {"key": "destination.port", "values": ["8080"]},
            {"key": "destination.ip", "values": ["198.19.2.10"]},
        ],
    }
    clauses = one({"rules": [rule]}).rules[0].clauses
    assert [list(c.matches) for c in clauses] == [
        [Match(destination_ports=[8080, 9090]), Match(not_destination_ports=[22])],
        [Match(namespaces=[S(exact="demo")])],
        [Match(source_cidrs=["10.0.0.0/8"], not_source_cidrs=["10.9.9.9/32"])],
        [Match(principals=[S(prefix="cluster.local/ns/demo/")])],
        [Match(not_namespaces=[S(exact="legacy")])],
        [Match(destination_ports=[8080])],
        [Match(destination_cidrs=["198.19.2.10/32"])],
    ]


L7_RULES = [
    {"to": [{"operation": {"methods": ["GET"]}}]},
    {"to": [{"operation": {"paths": ["/admin"], "ports": ["8080"]}}]},
    {"from": [{"source": {"requestPrincipals": ["*"]}}]},
    {"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"]}}]},
    {"when": [{"key": "request.headers[x-user]", "values": ["bob"]}]},
    {"when": [{"key": "request.auth.claims[iss]", "values": ["me"]}]},
]


@pytest.mark.parametrize("rule", L7_RULES)
def test_allow_rule_with_http_attribute_is_dropped(
    rule: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.authz")
    l4_rule = {"from": [{"source": {"namespaces": ["demo"]}}]}
    policy = one({"rules": [rule, l4_rule]})
    assert len(policy.rules) == 1  # only the L4 rule is left; the policy still applies
    assert policy.rules[0].clauses[0].matches[0] == Match(namespaces=[S(exact="demo")])
    assert policy.l7_attributes
    assert "ALLOW policy using them never match" in caplog.text
    assert "dir/authz.yaml#0: AuthorizationPolicy demo/p" in caplog.text


def test_allow_with_only_http_rules_allows_nothing() -> None:
    policy = one({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})
    assert policy.action == Policy.ALLOW and not policy.rules
    assert list(policy.l7_attributes) == ["methods"]


def test_deny_drops_only_the_http_condition() -> None:
    policy = one(
        {
            "action": "DENY",
            "rules": [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}],
                    "to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}],
                    "when": [{"key": "request.headers[x]", "values": ["y"]}],
                },
                {"to": [{"operation": {"paths": ["/admin"]}}]},
            ],
        }
    )
    first, second = policy.rules
    assert [list(c.matches) for c in first.clauses] == [
        [Match(destination_ports=[8080])],
        [Match(principals=[S(exact="cluster.local/ns/demo/sa/client")])],
        [Match()],  # the request.* condition: always holds
    ]
    assert [list(c.matches) for c in second.clauses] == [[Match()]]  # denies every connection
    assert sorted(policy.l7_attributes) == ["methods", "paths", "request.headers[x]"]


def test_target_refs_are_for_waypoints(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="controller.authz")
    ref = {"kind": "Service", "group": "", "name": "server"}
    assert run(policy_doc({"targetRefs": [ref], "action": "DENY", "rules": [{}]})) == {}
    assert run(policy_doc({"targetRef": ref, "rules": [{}]})) == {}
    assert "enforced by a waypoint, not by ztunnel" in caplog.text


def test_custom_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="controller.authz")
    spec = {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}
    assert run(policy_doc(spec)) == {}
    assert "action CUSTOM" in caplog.text and "demo/p" in caplog.text


def test_spiffe_prefixed_principal_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="controller.authz")
    one({"rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]}]})
    assert "never matches" in caplog.text


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ({"action": "REJECT"}, ["spec.action", "'REJECT'", "ALLOW, DENY, AUDIT, CUSTOM"]),
        ({"rules": {"from": []}}, ["spec.rules", "must be a list"]),
        ({"rules": ["x"]}, ["spec.rules[0]", "must be a mapping"]),
        ({"rules": [{"from": [{"source": {}}]}]}, ["spec.rules[0].from[0].source", "empty"]),
        ({"rules": [{"from": [{}]}]}, ["spec.rules[0].from[0].source", "is required"]),
        (
            {"rules": [{"from": [{"source": {"principals": []}}]}]},
            ["spec.rules[0].from[0].source", "must not be empty"],
        ),
        (
            {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            ["spec.rules[0].to[0].operation.ports[0]", "'http'", "port number"],
        ),
        (
            {"rules": [{"to": [{"operation": {"notPorts": [70000]}}]}]},
            ["operation.notPorts[0]", "70000"],
        ),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]},
            ["source.ipBlocks[0]", "'10.0.0.0/33'", "CIDR"],
        ),
        (
            {"rules": [{"from": [{"source": {"principal": ["x"]}}]}]},
            ["source.principal", "unknown field", "principals"],
        ),
        (
            {"rules": [{"from": [{"source": {"principals": "x"}}]}]},
            ["source.principals", "must be a list"],
        ),
        (
            {"rules": [{"from": [{"source": {"principals": [7]}}]}]},
            ["source.principals[0]", "non-empty string"],
        ),
        ({"rules": [{"when": [{"values": ["a"]}]}]}, ["spec.rules[0].when[0].key", "required"]),
        (
            {"rules": [{"when": [{"key": "source.ip"}]}]},
            ["spec.rules[0].when[0]", "values or notValues"],
        ),
        (
            {"rules": [{"when": [{"key": "source.user", "values": ["a"]}]}]},
            ["when[0].key", "'source.user'", "source.principal"],
        ),
        (
            {"rules": [{"when": [{"key": "destination.port", "values": ["x"]}]}]},
            ["when[0].values[0]", "port number"],
        ),
        (
            {"selector": {"matchLabels": {"app": "a"}}, "targetRefs": [{"name": "x"}]},
            ["spec.selector", "targetRefs"],
        ),
        ({"selector": {"matchLabels": {"v": 2}}}, ["spec.selector.matchLabels[v]", "quote"]),
    ],
)
def test_errors_name_source_object_and_field(spec: Any, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        run(policy_doc(spec))
    message = str(err.value)
    assert message.startswith("dir/authz.yaml#0: AuthorizationPolicy demo/p: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_other_api_versions_are_ignored() -> None:
    doc = policy_doc({"action": "DENY", "rules": [{}]})
    doc["apiVersion"] = "security.istio.io/v2"
    assert run(doc) == {}


def test_duplicate_policy_names_are_an_error() -> None:
    with pytest.raises(ConfigError, match="defined twice"):
        run(policy_doc({}), policy_doc({}))
