"""L7 authorization of one HTTP request at the waypoint, decided as Envoy's RBAC filter does
for the AuthorizationPolicies Istio binds to a waypoint (``targetRefs``), with no I/O so
every attribute is tested in a table.

Order: AUDIT policies that match are only reported; any matching DENY denies; then, if any
ALLOW policy applies, one must match; with none, the request is allowed. A denied request
is answered 403 ``RBAC: access denied``. Values match as Istio writes them (exact,
``prefix*``, ``*suffix``, ``*``: present); hosts ignore case; paths are matched without
their query string; a request without mTLS has no principal and no namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from mesh.api import mesh_pb2
from mesh.authz_match import holds, in_cidr, string_matches

Policy = mesh_pb2.HttpAuthorizationPolicy
Action = mesh_pb2.AuthorizationPolicy
DENIED_STATUS = 403
DENIED_BODY = b"RBAC: access denied"


@dataclass(frozen=True)
class RequestAttributes:
    principal: str | None  # the caller's SPIFFE ID without "spiffe://"; None: no mTLS
    namespace: str | None  # the caller's namespace (from its identity)
    source_ip: str
    host: str  # :authority (Host), as sent
    port: int  # the destination port the request came in on
    method: str
    path: str  # :path, query string included or not
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower case


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str | None = None  # namespace/name of the DENY or ALLOW policy that decided
    audit: tuple[str, ...] = ()  # namespace/name of every AUDIT policy that matched


def policy_ref(policy: Policy) -> str:
    return f"{policy.namespace}/{policy.name}"


def select(policies: Iterable[Policy], *target_refs: str) -> list[Policy]:
    """The policies bound to any of ``target_refs``: the waypoint's own
    ``Gateway/<ns>/<name>`` (all its traffic) and the requested ``Service/<ns>/<name>``."""
    wanted = set(target_refs)
    return [p for p in policies if wanted.intersection(p.target_refs)]


def evaluate(policies: Iterable[Policy], attrs: RequestAttributes) -> Decision:
    """``policies`` are those that apply to the request (see :func:`select`)."""
    policies = list(policies)
    audit = tuple(
        sorted(policy_ref(p) for p in policies if p.action == Action.AUDIT and matches(p, attrs))
    )
    for policy in policies:
        if policy.action == Action.DENY and matches(policy, attrs):
            return Decision(False, policy_ref(policy), audit)
    allow = [p for p in policies if p.action == Action.ALLOW]
    if not allow:
        return Decision(True, audit=audit)
    for policy in allow:
        if matches(policy, attrs):
            return Decision(True, policy_ref(policy), audit)
    return Decision(False, audit=audit)


def matches(policy: Policy, attrs: RequestAttributes) -> bool:
    """Any rule; a rule when all its clauses hold (none: always); a clause when any of its
    matches does. A policy without rules matches nothing."""
    return any(
        all(any(_match(m, attrs) for m in clause.matches) for clause in rule.clauses)
        for rule in policy.rules
    )


def _match(match: mesh_pb2.HttpAuthorizationMatch, attrs: RequestAttributes) -> bool:
    path = attrs.path.partition("?")[0].partition("#")[0]
    return (
        holds(match.principals, match.not_principals, lambda m: string_matches(m, attrs.principal))
        and holds(
            match.namespaces, match.not_namespaces, lambda m: string_matches(m, attrs.namespace)
        )
        and holds(match.source_cidrs, match.not_source_cidrs, in_cidr(attrs.source_ip))
        and holds(
            match.hosts, match.not_hosts, lambda m: string_matches(m, attrs.host, ignore_case=True)
        )
        and holds(match.ports, match.not_ports, lambda port: port == attrs.port)
        and holds(match.methods, match.not_methods, lambda m: string_matches(m, attrs.method))
        and holds(match.paths, match.not_paths, lambda m: string_matches(m, path))
        and all(_header(name, values.matches, attrs) for name, values in match.headers.items())
        and not any(_header(name, v.matches, attrs) for name, v in match.not_headers.items())
    )


def _header(name: str, values: Iterable[mesh_pb2.StringMatch], attrs: RequestAttributes) -> bool:
    """``request.headers[name]`` matches one of ``values``; ``*`` only asks that the header
    be present (Envoy's present_match), even empty."""
    value = attrs.headers.get(name)
    return any(
        value is not None if m.WhichOneof("kind") == "presence" else string_matches(m, value)
        for m in values
    )
