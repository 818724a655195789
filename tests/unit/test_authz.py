"""L4 authorization decisions (ztunnel/authz.py), table-driven; policies come from YAML
through the controller's translation, so each case reads as a user would write it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from controller.translate import SourcedObject, translate
from mesh.api import mesh_pb2
from mesh.spiffe import SpiffeId
from ztunnel.authz import NOT_ALLOWED, Authorized, Connection, Decision, evaluate, recheck
from ztunnel.state import MeshState

SERVER = mesh_pb2.Workload(
    uid="u-server", name="server", namespace="demo", labels={"app": "server"}
)
OTHER = mesh_pb2.Workload(uid="u-other", name="other", namespace="demo", labels={"app": "other"})
PROD = mesh_pb2.Workload(uid="u-prod", name="db", namespace="prod", labels={"app": "server"})

CLIENT_ID = SpiffeId("cluster.local", "demo", "client")
ADMIN_ID = SpiffeId("cluster.local", "ops", "admin")
CLIENT = Connection("198.19.1.10", CLIENT_ID, "198.19.2.10", 8080)
ADMIN = Connection("10.1.2.3", ADMIN_ID, "198.19.2.10", 8080)
PLAIN = Connection("198.19.1.20", None, "198.19.2.10", 8080)
CLIENT_9090 = Connection("198.19.1.10", CLIENT_ID, "198.19.2.10", 9090)


def policies(text: str) -> list[mesh_pb2.AuthorizationPolicy]:
    """Translate YAML documents (default namespace demo) as the controller does."""
    docs: list[dict[str, Any]] = []
    for index, spec in enumerate(yaml.safe_load_all(text)):
        meta = spec.pop("metadata", {})
        docs.append(
            {
                "apiVersion": "security.istio.io/v1beta1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": f"p{index}", "namespace": "demo", **meta},
                "spec": spec,
            }
        )
    out = translate([SourcedObject(d, f"t#{i}") for i, d in enumerate(docs)])
    return [r.authorization_policy for r in out.values()]


def src(action: str = "ALLOW", **source: list[str]) -> str:
    """One policy, one rule with one ``from.source``, as YAML."""
    return yaml.safe_dump({"action": action, "rules": [{"from": [{"source": source}]}]})


def to(action: str = "ALLOW", **operation: list[str]) -> str:
    return yaml.safe_dump({"action": action, "rules": [{"to": [{"operation": operation}]}]})


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> str:
    condition: dict[str, Any] = {"key": key, "values": values, "notValues": not_values}
    return yaml.safe_dump({"rules": [{"when": [condition]}]})


DENY_ALL = "action: DENY\nrules: [{}]"
ALLOW_ALL = "rules: [{}]"
CLIENT_P = "cluster.local/ns/demo/sa/client"

# (name, policy YAML, connection, allowed?): one row per rule kind and semantic.
CASES: list[tuple[str, str, Connection, bool]] = [
    ("no policy allows", "", CLIENT, True),
    ("allow-nothing (spec {}) denies", "{}", CLIENT, False),
    ("allow-all (rules [{}])", ALLOW_ALL, PLAIN, True),
    ("deny-all", DENY_ALL, CLIENT, False),
    ("DENY without rules matches nothing", "action: DENY", CLIENT, True),
    ("ALLOW with empty rules list", "rules: []", CLIENT, False),
    ("principal exact", src(principals=[CLIENT_P]), CLIENT, True),
    ("principal exact, other peer", src(principals=[CLIENT_P]), ADMIN, False),
    ("principal prefix", src(principals=["cluster.local/ns/demo/*"]), CLIENT, True),
    ("principal suffix", src(principals=["*/sa/client"]), CLIENT, True),
    ("principal suffix, other", src(principals=["*/sa/client"]), ADMIN, False),
    ("principal * needs mTLS", src(principals=["*"]), PLAIN, False),
    ("principal * any mTLS peer", src(principals=["*"]), ADMIN, True),
    ("notPrincipals excludes", src(notPrincipals=["*/sa/client"]), CLIENT, False),
    ("notPrincipals admits plaintext", src(notPrincipals=["*"]), PLAIN, True),
    ("namespaces", src(namespaces=["demo"]), CLIENT, True),
    ("namespaces, other", src(namespaces=["demo"]), ADMIN, False),
    ("namespaces, plaintext has none", src(namespaces=["*"]), PLAIN, False),
    ("notNamespaces", src(notNamespaces=["demo"]), ADMIN, True),
    ("notNamespaces excludes", src(notNamespaces=["demo"]), CLIENT, False),
    ("serviceAccounts", src(serviceAccounts=["client"]), CLIENT, True),
    ("serviceAccounts, other namespace", src(serviceAccounts=["client"]), ADMIN, False),
    ("ipBlocks", src(ipBlocks=["198.19.1.0/24"]), PLAIN, True),
    ("ipBlocks miss", src(ipBlocks=["198.19.1.0/24"]), ADMIN, False),
    ("notIpBlocks", src(notIpBlocks=["10.0.0.0/8"]), ADMIN, False),
    ("source fields AND", src(namespaces=["demo"], ipBlocks=["10.0.0.0/8"]), CLIENT, False),
    ("ports", to(ports=["8080"]), CLIENT, True),
    ("ports miss", to(ports=["8080"]), CLIENT_9090, False),
    ("notPorts", to(notPorts=["9090"]), CLIENT_9090, False),
    ("when source.ip", when("source.ip", ["198.19.1.10"]), CLIENT, True),
    ("when source.ip notValues", when("source.ip", None, ["198.19.1.0/24"]), CLIENT, False),
    ("when source.principal", when("source.principal", ["*/sa/admin"]), ADMIN, True),
    ("when source.namespace", when("source.namespace", ["demo"]), ADMIN, False),
    ("when destination.port", when("destination.port", ["9090"]), CLIENT_9090, True),
    ("when destination.port not", when("destination.port", None, ["8080"]), CLIENT, False),
    ("when destination.ip", when("destination.ip", ["198.19.2.0/24"]), CLIENT, True),
    # DENY wins over ALLOW; with ALLOW policies in scope, one of them must match.
    ("DENY over ALLOW", f"{ALLOW_ALL}\n---\n{src('DENY', namespaces=['demo'])}", CLIENT, False),
    ("DENY no match, ALLOW", f"{ALLOW_ALL}\n---\n{src('DENY', namespaces=['o'])}", CLIENT, True),
    ("ALLOW for another principal", src(principals=["*/sa/admin"]), CLIENT, False),
    (
        "any of two ALLOWs",
        f"{src(principals=['*/sa/admin'])}\n---\n{src(namespaces=['demo'])}",
        CLIENT,
        True,
    ),
    # HTTP attributes at L4: an ALLOW rule using one never matches; DENY ignores them.
    ("ALLOW with methods cannot allow", to(methods=["GET"]), CLIENT, False),
    (
        "ALLOW: HTTP rule dropped, L4 rule kept",
        "rules: [{to: [{operation: {paths: [/a]}}]}, {from: [{source: {namespaces: [demo]}}]}]",
        CLIENT,
        True,
    ),
    ("DENY with only methods denies all", to("DENY", methods=["POST"]), CLIENT, False),
    (
        "DENY methods + principal: the principal decides",
        "action: DENY\nrules: [{from: [{source: {principals: ['*/sa/admin']}}],"
        " to: [{operation: {methods: [POST]}}]}]",
        CLIENT,
        True,
    ),
    (
        "DENY when request.* holds",
        "action: DENY\nrules: [{when: [{key: 'request.headers[x]', values: [y]}]}]",
        CLIENT,
        False,
    ),
    ("DENY requestPrincipals", src("DENY", requestPrincipals=["*"]), PLAIN, False),
    # AUDIT never decides.
    ("AUDIT matching", "action: AUDIT\nrules: [{}]", CLIENT, True),
]


@pytest.mark.parametrize(
    ("policy", "conn", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decision(policy: str, conn: Connection, expected: bool) -> None:
    assert evaluate(policies(policy), SERVER, conn).allowed is expected


def test_deny_names_the_policy_and_reports_audits() -> None:
    text = """\
metadata: {name: audit-all}
action: AUDIT
rules: [{}]
---
metadata: {name: audit-admin}
action: AUDIT
rules: [{from: [{source: {namespaces: [ops]}}]}]
---
metadata: {name: deny-client}
action: DENY
rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]}]
"""
    assert evaluate(policies(text), SERVER, CLIENT) == Decision(
        False, "demo/deny-client", "explicitly denied by: demo/deny-client", ("demo/audit-all",)
    )
    assert evaluate(policies(text), SERVER, ADMIN) == Decision(
        True, audit=("demo/audit-admin", "demo/audit-all")
    )


def test_not_allowed_reason_is_istios() -> None:
    decision = evaluate(policies("{}"), SERVER, CLIENT)
    assert decision == Decision(False, "", NOT_ALLOWED)


@pytest.mark.parametrize(
    ("meta", "selector", "workload", "applies"),
    [
        ({}, None, SERVER, True),  # namespace-wide
        ({}, None, PROD, False),  # another namespace
        ({}, {"app": "server"}, SERVER, True),
        ({}, {"app": "server"}, OTHER, False),  # selector does not match
        ({"namespace": "istio-system"}, None, PROD, True),  # mesh-wide
        ({"namespace": "istio-system"}, {"app": "server"}, PROD, True),  # mesh-wide, selected
        ({"namespace": "istio-system"}, {"app": "server"}, OTHER, False),
        ({"namespace": "prod"}, None, SERVER, False),
    ],
)
def test_scope(
    meta: dict[str, str],
    selector: dict[str, str] | None,
    workload: mesh_pb2.Workload,
    applies: bool,
) -> None:
    spec: dict[str, Any] = {"metadata": meta, "action": "DENY", "rules": [{}]}
    if selector:
        spec["selector"] = {"matchLabels": selector}
    assert evaluate(policies(yaml.safe_dump(spec)), workload, CLIENT).allowed is not applies


def test_allow_for_another_workload_does_not_default_deny_this_one() -> None:
    text = "selector: {matchLabels: {app: other}}\nrules: [{from: [{source: {namespaces: [ops]}}]}]"
    assert evaluate(policies(text), SERVER, CLIENT).allowed
    assert not evaluate(policies(text), OTHER, CLIENT).allowed


def state_with(text: str) -> MeshState:
    resources = {
        f"authorization_policy/{p.namespace}/{p.name}": mesh_pb2.Resource(authorization_policy=p)
        for p in policies(text)
    }
    resources["workload/demo/server"] = mesh_pb2.Resource(workload=SERVER)
    resources["workload/prod/db"] = mesh_pb2.Resource(workload=PROD)
    return MeshState.build("1", resources)


def test_state_indexes_by_namespace_and_mesh() -> None:
    state = state_with(
        "metadata: {namespace: istio-system, name: mesh}\naction: DENY\n---\n"
        "metadata: {namespace: prod, name: db}\n---\n"
        "metadata: {name: a}\n---\nmetadata: {name: b}"
    )
    assert [p.name for p in state.authorization_policies_for(SERVER)] == ["a", "b", "mesh"]
    assert [p.name for p in state.authorization_policies_for(PROD)] == ["db", "mesh"]


def test_recheck_uses_the_current_state() -> None:
    admitted = Authorized(SERVER.uid, CLIENT)
    assert recheck(state_with(""), admitted).allowed
    denied = recheck(state_with("action: DENY\nrules: [{}]"), admitted)
    assert not denied.allowed and denied.policy == "demo/p0"
    # A workload the state no longer knows keeps its connections until its pod goes.
    assert recheck(state_with("action: DENY\nrules: [{}]"), Authorized("gone", CLIENT)).allowed
