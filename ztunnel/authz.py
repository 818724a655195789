"""L4 authorization of one inbound connection, decided as Istio's ztunnel does (rbac.rs,
state.rs ``assert_rbac``), with no I/O so every rule kind is tested in a table.

Order: AUDIT policies that match are only reported; any matching DENY denies; then, if
any ALLOW policy applies to the workload, one must match; with none, the connection is
allowed. A connection without mTLS has no principal and no namespace: principal and
namespace conditions never match it (their ``not`` forms always do).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mesh.api import mesh_pb2
from mesh.authz_match import holds, in_cidr, string_matches
from mesh.spiffe import SpiffeId
from ztunnel.state import MeshState

Policy = mesh_pb2.AuthorizationPolicy
_SPIFFE = "spiffe://"
NOT_ALLOWED = "allow policies exist, but none allowed"


@dataclass(frozen=True, slots=True)
class Connection:
    """What L4 authorization looks at; ``source`` is None for plaintext."""

    source_ip: str
    source: SpiffeId | None
    destination_ip: str
    destination_port: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str = ""  # namespace/name of the DENY policy that matched
    reason: str = ""  # why a connection was denied, for logs and the HBONE status
    audit: tuple[str, ...] = ()  # namespace/name of every AUDIT policy that matched


@dataclass(frozen=True, slots=True)
class Authorized:
    """An admitted inbound connection's input, kept to re-check it when policies change."""

    workload_uid: str
    connection: Connection
    audit: tuple[str, ...] = ()  # AUDIT policies that matched, for the access log


def recheck(state: MeshState, authorized: Authorized) -> Decision:
    """Istio's ztunnel closes open connections a policy update denies; a workload the new
    state no longer knows keeps its connections until its pod is released."""
    workload = state.workloads.get(authorized.workload_uid)
    if workload is None:
        return Decision(True)
    return authorize(state, workload, authorized.connection)


def authorize(state: MeshState, workload: mesh_pb2.Workload, conn: Connection) -> Decision:
    """``evaluate`` with the policies of the current state that may apply to ``workload``."""
    return evaluate(state.authorization_policies_for(workload), workload, conn)


def policy_ref(policy: Policy) -> str:
    return f"{policy.namespace}/{policy.name}"


def applies_to(policy: Policy, workload: mesh_pb2.Workload) -> bool:
    """In the workload's namespace (or mesh-wide) and every selector label equal."""
    return (policy.scope == mesh_pb2.MESH or policy.namespace == workload.namespace) and all(
        workload.labels.get(k) == v for k, v in policy.selector.items()
    )


def evaluate(policies: Iterable[Policy], workload: mesh_pb2.Workload, conn: Connection) -> Decision:
    in_scope = [p for p in policies if applies_to(p, workload)]
    audit = tuple(
        sorted(policy_ref(p) for p in in_scope if p.action == Policy.AUDIT and matches(p, conn))
    )
    for policy in in_scope:
        if policy.action == Policy.DENY and matches(policy, conn):
            ref = policy_ref(policy)
            return Decision(False, ref, f"explicitly denied by: {ref}", audit)
    allow = [p for p in in_scope if p.action == Policy.ALLOW]
    if not allow or any(matches(p, conn) for p in allow):
        return Decision(True, audit=audit)
    return Decision(False, reason=NOT_ALLOWED, audit=audit)


def matches(policy: Policy, conn: Connection) -> bool:
    """Any rule; a rule when all its clauses hold; a clause when any of its matches does."""
    return any(
        all(any(_match(m, conn) for m in clause.matches) for clause in rule.clauses)
        for rule in policy.rules
    )


def _match(match: mesh_pb2.AuthorizationMatch, conn: Connection) -> bool:
    principal = conn.source.uri[len(_SPIFFE) :] if conn.source else None
    namespace = conn.source.namespace if conn.source else None
    return (
        holds(match.principals, match.not_principals, lambda m: string_matches(m, principal))
        and holds(match.namespaces, match.not_namespaces, lambda m: string_matches(m, namespace))
        and holds(match.source_cidrs, match.not_source_cidrs, in_cidr(conn.source_ip))
        and holds(
            match.destination_cidrs, match.not_destination_cidrs, in_cidr(conn.destination_ip)
        )
        and holds(
            match.destination_ports,
            match.not_destination_ports,
            lambda port: port == conn.destination_port,
        )
    )
