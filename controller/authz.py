"""Istio AuthorizationPolicy -> the L4 form ztunnel enforces, with no I/O.

Follows what istiod sends Istio's ztunnel (pilot ambient ``convertAuthorizationPolicy``):

- a policy with ``targetRef(s)`` is for a waypoint, not ztunnel: skipped here;
- ALLOW, DENY and AUDIT are translated; CUSTOM needs an external authorizer ztunnel
  never calls, so it is skipped with a warning (istiod: "ztunnel does not support the
  CUSTOM action"). Istio's ztunnel also skips AUDIT; ours logs its matches, nothing more;
- HTTP attributes (methods, paths, hosts, requestPrincipals, remoteIpBlocks, ``when`` on
  ``request.*`` ...) cannot be seen at L4. In an ALLOW policy the rule using one is
  dropped, so it never allows; in DENY (and AUDIT) only the HTTP condition is dropped, so
  the rest of the rule denies: both stricter than written, as Istio warns.

Each rule becomes clauses ANDed together: one for ``to``, one for ``from`` (a clause holds
when any of its entries does) and one per ``when`` condition.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from google.protobuf.message import Message

from controller.fields import ConfigObject
from controller.quoting import clip, quote
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)

KIND = "AuthorizationPolicy"
API_VERSIONS = ("security.istio.io/v1beta1", "security.istio.io/v1")

Policy = mesh_pb2.AuthorizationPolicy
_ACTIONS = {"ALLOW": Policy.ALLOW, "DENY": Policy.DENY, "AUDIT": Policy.AUDIT}

# source / operation fields: the L4 ones we translate, and the HTTP ones only a waypoint sees.
_SOURCE_L4 = (
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
)
_SOURCE_L7 = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION_L4 = ("ports", "notPorts")
_OPERATION_L7 = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_WHEN_L4 = (
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
)
_WHEN_L7_PREFIXES = ("request.", "experimental.")
_WHEN_L7 = ("remote.ip", "connection.sni")


def authorization_policy(obj: ConfigObject, root_namespace: str) -> Policy | None:
    """The policy as ztunnel enforces it, or None when it is not ztunnel's to enforce."""
    selector = obj.labels("spec.selector.matchLabels")
    if obj.get("spec.targetRefs", list) or obj.get("spec.targetRef", Mapping):
        if obj.get("spec.selector", Mapping) is not None:
            raise obj.error("spec.selector", "only one of selector and targetRefs may be set")
        log.debug("%s: has targetRefs: enforced by a waypoint, not by ztunnel", obj.describe())
        return None
    action = policy_action(obj, "ztunnel")
    if action is None:
        return None
    if obj.namespace == root_namespace:
        scope = mesh_pb2.MESH
    else:
        scope = mesh_pb2.WORKLOAD if selector else mesh_pb2.NAMESPACE
    policy = Policy(
        name=obj.name, namespace=obj.namespace, scope=scope, selector=selector, action=action
    )
    l7: list[str] = []
    for index, raw in enumerate(obj.get("spec.rules", list, [])):
        rule, rule_l7 = _rule(obj, f"spec.rules[{index}]", raw)
        l7 += [name for name in rule_l7 if name not in l7]
        if rule_l7 and action == Policy.ALLOW:
            continue  # an ALLOW rule that needs HTTP can never be satisfied at L4
        policy.rules.append(rule)
    if l7:
        policy.l7_attributes.extend(l7)
        log.warning(
            "%s: ztunnel does not see HTTP attributes (found: %s); a waypoint must enforce "
            "them. %s This is more restrictive than requested.",
            obj.describe(),
            ", ".join(l7),
            "Rules of an ALLOW policy using them never match."
            if action == Policy.ALLOW
            else "They are dropped from the rules, which then match without them.",
        )
    return policy


def policy_action(obj: ConfigObject, enforcer: str) -> Policy.Action.ValueType | None:
    """``spec.action``; None for CUSTOM, which needs an external authorizer we never call."""
    action_name = obj.get("spec.action", str, "ALLOW")
    if action_name.upper() == "CUSTOM":
        log.warning(
            "%s: action CUSTOM needs an external authorizer, which %s does not call; "
            "ignored (as Istio's %s does)",
            obj.describe(),
            enforcer,
            enforcer,
        )
        return None
    if action_name.upper() not in _ACTIONS:
        known = "ALLOW, DENY, AUDIT, CUSTOM"
        raise obj.error("spec.action", f"{quote(action_name)} is not one of: {known}")
    return _ACTIONS[action_name.upper()]


M = TypeVar("M", bound=Message)
Translator = Callable[[ConfigObject, str, Any, list[str]], M]


def rule_clauses(
    obj: ConfigObject,
    where: str,
    raw: Any,
    operation: Translator[M],
    source: Translator[M],
    when: Translator[M],
) -> tuple[list[list[M]], list[str]]:
    """A rule's clauses (``to``, ``from``, one per ``when``), each a list of ORed matches,
    and the attributes the enforcer cannot see (collected by the translators)."""
    if not isinstance(raw, Mapping):
        raise obj.error(where, "must be a mapping (with from, to and when)")
    clauses: list[list[M]] = []
    unseen: list[str] = []
    for part, field, translate in (("to", "operation", operation), ("from", "source", source)):
        entries = _list(obj, f"{where}.{part}", raw.get(part))
        if entries:
            clause = []
            for index, entry in enumerate(entries):
                at = f"{where}.{part}[{index}].{field}"
                body = entry.get(field) if isinstance(entry, Mapping) else None
                if not isinstance(body, Mapping):
                    raise obj.error(at, "is required (a mapping)")
                before = len(unseen)
                match = translate(obj, at, body, unseen)
                if not match.ListFields() and len(unseen) == before:
                    raise obj.error(at, "must not be empty (as in Istio)")
                clause.append(match)
            clauses.append(clause)
    for index, condition in enumerate(_list(obj, f"{where}.when", raw.get("when"))):
        clauses.append([when(obj, f"{where}.when[{index}]", condition, unseen)])
    return clauses, unseen


def _rule(obj: ConfigObject, where: str, raw: Any) -> tuple[mesh_pb2.AuthorizationRule, list[str]]:
    clauses, l7 = rule_clauses(obj, where, raw, _operation, source_match, when_match)
    rule = mesh_pb2.AuthorizationRule(
        clauses=[mesh_pb2.AuthorizationClause(matches=matches) for matches in clauses]
    )
    return rule, l7


def source_match(
    obj: ConfigObject, where: str, source: Mapping[str, Any], l7: list[str]
) -> mesh_pb2.AuthorizationMatch:
    check_fields(obj, where, source, _SOURCE_L4 + _SOURCE_L7)
    l7 += [name for name in _SOURCE_L7 if source.get(name)]
    values = {name: strings(obj, f"{where}.{name}", source.get(name)) for name in _SOURCE_L4}
    for name in ("principals", "notPrincipals"):
        for value in values[name]:
            if value.startswith("spiffe://"):
                log.warning(
                    "%s: %s.%s: %s never matches: Istio writes principals without spiffe://",
                    obj.describe(),
                    where,
                    name,
                    quote(value),
                )
    match = mesh_pb2.AuthorizationMatch(
        principals=[*map(string_match, values["principals"])],
        not_principals=[*map(string_match, values["notPrincipals"])],
        namespaces=[*map(string_match, values["namespaces"])],
        not_namespaces=[*map(string_match, values["notNamespaces"])],
        source_cidrs=cidrs(obj, f"{where}.ipBlocks", values["ipBlocks"]),
        not_source_cidrs=cidrs(obj, f"{where}.notIpBlocks", values["notIpBlocks"]),
    )
    # A service account is "<ns>/<sa>" or "<sa>" of the policy's namespace, in any trust domain.
    for name, target in (
        ("serviceAccounts", match.principals),
        ("notServiceAccounts", match.not_principals),
    ):
        for account in values[name]:
            ns, _, sa = account.rpartition("/")
            target.append(mesh_pb2.StringMatch(suffix=f"/ns/{ns or obj.namespace}/sa/{sa}"))
    return match


def _operation(
    obj: ConfigObject, where: str, operation: Mapping[str, Any], l7: list[str]
) -> mesh_pb2.AuthorizationMatch:
    check_fields(obj, where, operation, _OPERATION_L4 + _OPERATION_L7)
    l7 += [name for name in _OPERATION_L7 if operation.get(name)]
    return mesh_pb2.AuthorizationMatch(
        destination_ports=ports(obj, f"{where}.ports", operation.get("ports")),
        not_destination_ports=ports(obj, f"{where}.notPorts", operation.get("notPorts")),
    )


def when_match(
    obj: ConfigObject, where: str, condition: Any, l7: list[str]
) -> mesh_pb2.AuthorizationMatch:
    if not isinstance(condition, Mapping):
        raise obj.error(where, "must be a mapping with key and values or notValues")
    key = condition.get("key")
    if not isinstance(key, str) or not key:
        raise obj.error(f"{where}.key", "is required")
    values = strings(obj, f"{where}.values", condition.get("values"))
    not_values = strings(obj, f"{where}.notValues", condition.get("notValues"))
    if not values and not not_values:
        raise obj.error(where, "needs values or notValues")
    if key.startswith(_WHEN_L7_PREFIXES) or key in _WHEN_L7:
        l7.append(key)
        return mesh_pb2.AuthorizationMatch()
    if key not in _WHEN_L4:
        known = ", ".join(_WHEN_L4 + _WHEN_L7) + ", request.*"
        raise obj.error(f"{where}.key", f"{quote(key)} is not an attribute Istio knows ({known})")
    match = mesh_pb2.AuthorizationMatch()
    for found, sign in ((values, ""), (not_values, "not_")):
        at = f"{where}.{'notValues' if sign else 'values'}"
        if key == "source.principal":
            getattr(match, sign + "principals").extend(map(string_match, found))
        elif key == "source.namespace":
            getattr(match, sign + "namespaces").extend(map(string_match, found))
        elif key == "source.ip":
            getattr(match, sign + "source_cidrs").extend(cidrs(obj, at, found))
        elif key == "destination.ip":
            getattr(match, sign + "destination_cidrs").extend(cidrs(obj, at, found))
        else:
            getattr(match, sign + "destination_ports").extend(ports(obj, at, found))
    return match


def string_match(value: str) -> mesh_pb2.StringMatch:
    """Istio's wildcard: ``*`` alone is presence, a leading or trailing one a suffix/prefix."""
    if value == "*":
        return mesh_pb2.StringMatch(presence=True)
    if value.startswith("*"):
        return mesh_pb2.StringMatch(suffix=value[1:])
    if value.endswith("*"):
        return mesh_pb2.StringMatch(prefix=value[:-1])
    return mesh_pb2.StringMatch(exact=value)


def cidrs(obj: ConfigObject, where: str, values: list[str]) -> list[str]:
    out = []
    for index, value in enumerate(values):
        try:
            out.append(str(ipaddress.ip_network(value, strict=False)))
        except ValueError:
            raise obj.error(
                f"{where}[{index}]", f"{quote(value)} is not an IP address or CIDR"
            ) from None
    return out


def ports(obj: ConfigObject, where: str, raw: Any) -> list[int]:
    out = []
    for index, value in enumerate(_list(obj, where, raw)):
        number = int(value) if isinstance(value, str) and value.isdigit() else value
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 65535:
            raise obj.error(f"{where}[{index}]", f"{quote(value)} is not a port number (1-65535)")
        out.append(number)
    return out


def strings(obj: ConfigObject, where: str, raw: Any) -> list[str]:
    values = _list(obj, where, raw)
    for index, value in enumerate(values):
        if not isinstance(value, str) or not value:
            raise obj.error(f"{where}[{index}]", f"must be a non-empty string, got {quote(value)}")
    return values


def _list(obj: ConfigObject, where: str, raw: Any) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise obj.error(where, f"must be a list, got {type(raw).__name__}")
    return raw


def check_fields(
    obj: ConfigObject, where: str, body: Mapping[str, Any], known: tuple[str, ...]
) -> None:
    for name in body:
        if name not in known:
            raise obj.error(
                f"{where}.{clip(str(name))}", f"unknown field (known: {', '.join(known)})"
            )
