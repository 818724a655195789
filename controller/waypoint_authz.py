"""AuthorizationPolicy bound to a waypoint (``targetRefs``) -> HttpAuthorizationPolicy, and
the L4 policy that keeps callers from going around the waypoint.

Rules are read with controller/authz.py's helpers, so both enforcers understand the same
YAML the same way. What the waypoint cannot check (request principals from JWTs, remote
IPs from X-Forwarded-For, destination IPs...) is handled as istiod does for ztunnel: an
ALLOW rule using it is dropped (it never allows), a DENY/AUDIT rule loses only that
condition (it denies more), with a warning.

Bypass protection: a Service behind a waypoint that an ALLOW or DENY policy protects gets
``authorization_policy/<ns>/waypoint-only-<service>``, an L4 ALLOW for the Service's pods
admitting only the waypoint's identity, so ztunnel refuses anyone dialing the pods
directly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from controller import authz
from controller.fields import ConfigObject, View
from controller.hosts import ServiceIndex
from controller.quoting import quote
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)

KIND_HTTP_AUTHORIZATION_POLICY = "http_authorization_policy"
BYPASS_PREFIX = "waypoint-only-"
_OPERATION = (
    *("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"),
)
_HEADER_KEY = "request.headers["
_GATEWAY_GROUP = "gateway.networking.k8s.io"
Policy = mesh_pb2.HttpAuthorizationPolicy


def http_authorization_policy(obj: ConfigObject) -> Policy | None:
    """The policy the waypoint enforces; None for one without targetRefs (ztunnel's) or
    with action CUSTOM."""
    spec = View.of(obj, "spec")
    refs = spec.views("targetRefs")
    if (single := spec.view("targetRef")) is not None:
        refs.append(single)
    if not refs:
        return None
    action = authz.policy_action(obj, "the waypoint")
    if action is None:
        return None
    policy = Policy(name=obj.name, namespace=obj.namespace, action=action)
    for ref in refs:
        ref.check_fields(("group", "kind", "name", "namespace"))
        kind, group = ref.string("kind", required=True), ref.string("group")
        if (kind, group) not in (("Gateway", _GATEWAY_GROUP), ("Service", ""), ("Service", "core")):
            raise ref.error(
                "kind", f"{quote(kind)} (group {quote(group)}): must be a Gateway or a Service"
            )
        if ref.string("namespace", obj.namespace) != obj.namespace:
            raise ref.error("namespace", "must be the policy's own namespace (as in Istio)")
        policy.target_refs.append(f"{kind}/{obj.namespace}/{ref.string('name', required=True)}")
    unseen: list[str] = []
    for index, raw in enumerate(spec.sequence("rules")):
        clauses, rule_unseen = authz.rule_clauses(
            obj, f"spec.rules[{index}]", raw, _operation, _source, _when
        )
        unseen += [name for name in rule_unseen if name not in unseen]
        if rule_unseen and action == authz.Policy.ALLOW:
            continue
        policy.rules.add(clauses=[mesh_pb2.HttpAuthorizationClause(matches=c) for c in clauses])
    if unseen:
        log.warning(
            "%s: the waypoint does not check %s. %s This is more restrictive than requested.",
            obj.describe(),
            ", ".join(unseen),
            "Rules of an ALLOW policy using them never match."
            if action == authz.Policy.ALLOW
            else "They are dropped from the rules, which then match without them.",
        )
    return policy


def bypass_policies(
    policies: list[Policy],
    services: ServiceIndex,
    waypoints: Mapping[str, mesh_pb2.Waypoint],
) -> list[mesh_pb2.AuthorizationPolicy]:
    """L4 ALLOW-only-the-waypoint policies for every Service an ALLOW/DENY policy protects."""
    protected: dict[tuple[str, str], str] = {}
    for policy in policies:
        if policy.action not in (authz.Policy.ALLOW, authz.Policy.DENY):
            continue
        for ref in policy.target_refs:
            kind, namespace, name = ref.split("/", 2)
            for key, service in services.services.items():
                if kind == "Gateway" and service.waypoint == f"{namespace}/{name}":
                    protected.setdefault(key, f"{policy.namespace}/{policy.name}")
                elif kind == "Service" and key == (namespace, name):
                    if service.waypoint:
                        protected.setdefault(key, f"{policy.namespace}/{policy.name}")
                    else:
                        log.warning(
                            "AuthorizationPolicy %s/%s: Service %s/%s uses no waypoint; "
                            "its L7 rules are not enforced",
                            policy.namespace,
                            policy.name,
                            namespace,
                            name,
                        )
    out = []
    for (namespace, name), by in sorted(protected.items()):
        service = services.services[(namespace, name)]
        selector = services.selectors.get((namespace, name), {})
        waypoint = waypoints.get(service.waypoint)
        if not selector or waypoint is None:
            continue
        principal = f"{waypoint.trust_domain}/ns/{waypoint.namespace}/sa/{waypoint.service_account}"
        log.debug(
            "Service %s/%s: only waypoint %s may reach its pods (policy %s)",
            namespace,
            name,
            service.waypoint,
            by,
        )
        match = mesh_pb2.AuthorizationMatch(principals=[mesh_pb2.StringMatch(exact=principal)])
        clause = mesh_pb2.AuthorizationClause(matches=[match])
        out.append(
            mesh_pb2.AuthorizationPolicy(
                name=f"{BYPASS_PREFIX}{name}",
                namespace=namespace,
                scope=mesh_pb2.WORKLOAD,
                selector=selector,
                action=authz.Policy.ALLOW,
                rules=[mesh_pb2.AuthorizationRule(clauses=[clause])],
            )
        )
    return out


def _from_l4(match: mesh_pb2.AuthorizationMatch) -> mesh_pb2.HttpAuthorizationMatch:
    return mesh_pb2.HttpAuthorizationMatch(
        principals=match.principals,
        not_principals=match.not_principals,
        namespaces=match.namespaces,
        not_namespaces=match.not_namespaces,
        source_cidrs=match.source_cidrs,
        not_source_cidrs=match.not_source_cidrs,
        ports=match.destination_ports,
        not_ports=match.not_destination_ports,
    )


def _source(
    obj: ConfigObject, where: str, body: Mapping[str, Any], unseen: list[str]
) -> mesh_pb2.HttpAuthorizationMatch:
    return _from_l4(authz.source_match(obj, where, body, unseen))


def _operation(
    obj: ConfigObject, where: str, body: Mapping[str, Any], unseen: list[str]
) -> mesh_pb2.HttpAuthorizationMatch:
    authz.check_fields(obj, where, body, _OPERATION)

    def matches(name: str) -> list[mesh_pb2.StringMatch]:
        return [
            authz.string_match(v) for v in authz.strings(obj, f"{where}.{name}", body.get(name))
        ]

    return mesh_pb2.HttpAuthorizationMatch(
        hosts=matches("hosts"),
        not_hosts=matches("notHosts"),
        methods=matches("methods"),
        not_methods=matches("notMethods"),
        paths=matches("paths"),
        not_paths=matches("notPaths"),
        ports=authz.ports(obj, f"{where}.ports", body.get("ports")),
        not_ports=authz.ports(obj, f"{where}.notPorts", body.get("notPorts")),
    )


def _when(
    obj: ConfigObject, where: str, condition: Any, unseen: list[str]
) -> mesh_pb2.HttpAuthorizationMatch:
    key = condition.get("key") if isinstance(condition, Mapping) else None
    if isinstance(key, str) and key.startswith(_HEADER_KEY) and key.endswith("]"):
        header = key[len(_HEADER_KEY) : -1].lower()
        if not header:
            raise obj.error(f"{where}.key", f"{quote(key)} names no header")
        match = mesh_pb2.HttpAuthorizationMatch()
        for field, target in (("values", match.headers), ("notValues", match.not_headers)):
            values = authz.strings(obj, f"{where}.{field}", condition.get(field))
            if values:
                target[header].matches.extend(map(authz.string_match, values))
        if not match.headers and not match.not_headers:
            raise obj.error(where, "needs values or notValues")
        return match
    l4 = authz.when_match(obj, where, condition, unseen)
    if l4.destination_cidrs or l4.not_destination_cidrs:
        unseen.append(str(key))
    return _from_l4(l4)
