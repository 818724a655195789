"""L7 authorization decisions at the waypoint (waypoint/authz.py), table-driven; each
policy is written the way Istio's fields read (``"*"``, ``"prefix*"``, ``"*suffix"``),
turned into matchers by the controller's own ``string_match``."""

from __future__ import annotations

from typing import Any

import pytest

from controller.authz import string_match
from mesh.api import mesh_pb2
from waypoint.authz import (
    DENIED_BODY,
    DENIED_STATUS,
    Decision,
    RequestAttributes,
    evaluate,
    select,
)

Action = mesh_pb2.AuthorizationPolicy

CLIENT = RequestAttributes(
    principal="cluster.local/ns/demo/sa/client",
    namespace="demo",
    source_ip="198.19.1.10",
    host="reviews.demo.svc.cluster.local:9080",
    port=9080,
    method="GET",
    path="/api/v1/books?id=3",
    headers={"x-user": "alice", "x-empty": ""},
)
ADMIN = RequestAttributes(
    principal="cluster.local/ns/ops/sa/admin",
    namespace="ops",
    source_ip="10.1.2.3",
    host="Reviews.Demo.svc.cluster.local:9080",
    port=9080,
    method="DELETE",
    path="/admin/users",
)
PLAIN = RequestAttributes(None, None, "198.19.1.20", "reviews:9080", 9080, "GET", "/")


def match(**fields: Any) -> mesh_pb2.HttpAuthorizationMatch:
    out = mesh_pb2.HttpAuthorizationMatch()
    for key, values in fields.items():
        if key in ("headers", "not_headers"):
            for name, patterns in values.items():
                getattr(out, key)[name].matches.extend(string_match(p) for p in patterns)
        elif key in ("ports", "not_ports", "source_cidrs", "not_source_cidrs"):
            getattr(out, key).extend(values)
        else:
            getattr(out, key).extend(string_match(v) for v in values)
    return out


def policy(action: str = "ALLOW", *clauses: list[dict[str, Any]], name: str = "p") -> Any:
    """One policy with one rule made of ``clauses`` (AND), each a list of matches (OR)."""
    rule = mesh_pb2.HttpAuthorizationRule(
        clauses=[
            mesh_pb2.HttpAuthorizationClause(matches=[match(**m) for m in clause])
            for clause in clauses
        ]
    )
    return mesh_pb2.HttpAuthorizationPolicy(
        name=name, namespace="demo", action=Action.Action.Value(action), rules=[rule]
    )


def allow(name: str = "p", **fields: Any) -> Any:
    """An ALLOW policy whose one rule is one match of ``fields``."""
    return policy("ALLOW", [fields], name=name)


def deny(name: str = "p", **fields: Any) -> Any:
    return policy("DENY", [fields], name=name)


HOST = "reviews.demo.svc.cluster.local"
NO_RULES = mesh_pb2.HttpAuthorizationPolicy(name="e", action=Action.ALLOW)

CASES: list[tuple[str, list[Any], RequestAttributes, bool]] = [
    ("no policies: allow", [], CLIENT, True),
    ("allow by principal", [allow(principals=["*/sa/client"])], CLIENT, True),
    ("allow, other principal", [allow(principals=["*/sa/client"])], ADMIN, False),
    ("principal * needs mTLS", [allow(principals=["*"])], PLAIN, False),
    ("not_principals holds without mTLS", [allow(not_principals=["*"])], PLAIN, True),
    ("namespace prefix", [allow(namespaces=["de*"])], CLIENT, True),
    ("namespace plaintext", [allow(namespaces=["demo"])], PLAIN, False),
    ("cidr", [allow(source_cidrs=["198.19.0.0/16"])], CLIENT, True),
    ("not cidr", [allow(not_source_cidrs=["10.0.0.0/8"])], ADMIN, False),
    ("method exact", [allow(methods=["GET", "HEAD"])], CLIENT, True),
    ("method is case-sensitive", [allow(methods=["get"])], CLIENT, False),
    ("path exact ignores query", [allow(paths=["/api/v1/books"])], CLIENT, True),
    ("path prefix", [allow(paths=["/api/*"])], CLIENT, True),
    ("path suffix", [allow(paths=["*/books"])], CLIENT, True),
    ("path suffix, query not part", [allow(paths=["*=3"])], CLIENT, False),
    ("path any", [allow(paths=["*"])], PLAIN, True),
    ("path case-sensitive", [allow(paths=["/API/*"])], CLIENT, False),
    ("not_paths", [allow(not_paths=["/admin*"])], ADMIN, False),
    ("host ignores case", [allow(hosts=[f"{HOST}:9080"])], ADMIN, True),
    ("host suffix", [allow(hosts=["*.cluster.local:9080"])], CLIENT, True),
    ("host without port is another host", [allow(hosts=[HOST])], CLIENT, False),
    ("host prefix", [allow(hosts=["REVIEWS.*"])], CLIENT, True),
    ("ports", [allow(ports=[9080])], CLIENT, True),
    ("not_ports", [allow(not_ports=[9080])], CLIENT, False),
    ("header value", [allow(headers={"x-user": ["ali*"]})], CLIENT, True),
    ("header absent", [allow(headers={"x-user": ["*"]})], ADMIN, False),
    ("header present, even empty", [allow(headers={"x-empty": ["*"]})], CLIENT, True),
    ("not header value", [allow(not_headers={"x-user": ["alice"]})], CLIENT, False),
    ("not header holds when absent", [allow(not_headers={"x-user": ["alice"]})], ADMIN, True),
    ("fields of a match AND", [allow(methods=["GET"], paths=["/admin*"])], CLIENT, False),
    (
        "matches of a clause OR",
        [policy("ALLOW", [{"methods": ["PUT"]}, {"paths": ["/a*"]}])],
        CLIENT,
        True,
    ),
    (
        "clauses AND",
        [policy("ALLOW", [{"namespaces": ["demo"]}], [{"methods": ["PUT"]}])],
        CLIENT,
        False,
    ),
    ("rule without clauses: everything", [policy("ALLOW")], PLAIN, True),
    ("policy without rules: nothing", [NO_RULES], CLIENT, False),
    ("deny matches", [deny(methods=["DELETE"])], ADMIN, False),
    ("deny does not match", [deny(methods=["DELETE"])], CLIENT, True),
    (
        "deny wins over allow",
        [allow("a", namespaces=["ops"]), deny("d", paths=["/admin*"])],
        ADMIN,
        False,
    ),
    (
        "one of many allows",
        [allow("a", namespaces=["prod"]), allow("b", namespaces=["ops"])],
        ADMIN,
        True,
    ),
    ("audit only", [policy("AUDIT", [{"paths": ["*"]}])], CLIENT, True),
    (
        "audit does not count as allow",
        [policy("AUDIT"), allow("a", namespaces=["x"])],
        CLIENT,
        False,
    ),
]


@pytest.mark.parametrize(
    ("policies", "attrs", "allowed"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_decisions(policies: list[Any], attrs: RequestAttributes, allowed: bool) -> None:
    assert evaluate(policies, attrs).allowed is allowed


def test_decision_names_the_deciding_policy_and_audits() -> None:
    audit = policy("AUDIT", [{"paths": ["/admin*"]}], name="watch")
    allow = policy("ALLOW", [{"namespaces": ["ops"]}], name="ops")
    deny = policy("DENY", [{"methods": ["DELETE"]}], name="no-delete")
    assert evaluate([audit, allow], ADMIN) == Decision(True, "demo/ops", ("demo/watch",))
    assert evaluate([audit, allow, deny], ADMIN) == Decision(
        False, "demo/no-delete", ("demo/watch",)
    )
    assert evaluate([allow], CLIENT) == Decision(False)
    assert evaluate([], CLIENT) == Decision(True)


def test_denial_answer() -> None:
    assert (DENIED_STATUS, DENIED_BODY) == (403, b"RBAC: access denied")


def test_select_by_target_refs() -> None:
    gateway = policy(name="gw")
    gateway.target_refs.append("Gateway/demo/waypoint")
    service = policy(name="svc")
    service.target_refs.append("Service/demo/reviews")
    other = policy(name="other")
    other.target_refs.append("Service/demo/ratings")
    chosen = select([gateway, service, other], "Gateway/demo/waypoint", "Service/demo/reviews")
    assert [p.name for p in chosen] == ["gw", "svc"]
