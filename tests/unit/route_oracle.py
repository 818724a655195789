"""The HttpRouteTable contract (docs/waypoint.md) as a tiny reference interpreter.

Tests translate real YAML, then ask which rule a request hits and what it becomes, the
way Gateway API conformance tests send requests: so they check routing behavior, not the
shape of the protobuf.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.api import mesh_pb2


@dataclass(frozen=True)
class Request:
    path: str = "/"
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    port: int = 80
    source_namespace: str = "demo"


def string_matches(match: mesh_pb2.HttpStringMatch, value: str) -> bool:
    kind = match.WhichOneof("kind")
    if kind == "exact":
        return value == match.exact
    if kind == "prefix":
        return value.startswith(match.prefix)
    return re.fullmatch(match.regex, value) is not None


def matches(match: mesh_pb2.HttpRouteMatch, request: Request) -> bool:
    if match.HasField("path") and not string_matches(match.path, request.path):
        return False
    for header in match.headers:
        value = {k.lower(): v for k, v in request.headers.items()}.get(header.name)
        hit = value is not None and string_matches(header.value, value)
        if hit == header.invert:
            return False
    for param in match.query_params:
        value = request.query.get(param.name)
        if value is None or not string_matches(param.value, value):
            return False
    return (
        (not match.method or match.method == request.method)
        and (not match.port or match.port == request.port)
        and (not match.source_namespace or match.source_namespace == request.source_namespace)
    )


def route(table: mesh_pb2.HttpRouteTable, request: Request) -> mesh_pb2.HttpRouteRule | None:
    """The first rule that matches, as the waypoint picks it."""
    for rule in table.rules:
        if not rule.matches or any(matches(m, request) for m in rule.matches):
            return rule
    return None


def backend_names(rule: mesh_pb2.HttpRouteRule) -> list[str]:
    """``<service short name>[:subset]`` of each weighted backend, ``!`` for invalid ones."""
    return [
        (b.service.split(".")[0] or "!") + (f":{b.subset}" if b.subset else "")
        for b in rule.backends
    ]


def matched_prefix(rule: mesh_pb2.HttpRouteRule, request: Request) -> str:
    """What a prefix rewrite replaces: a ``prefix`` match's string, a regex's ``prefix``
    group, else the whole path."""
    match = next(m for m in rule.matches if matches(m, request))
    kind = match.path.WhichOneof("kind")
    if kind == "prefix":
        return match.path.prefix
    found = re.fullmatch(match.path.regex, request.path) if kind == "regex" else None
    if found is not None and "prefix" in found.re.groupindex:
        return str(found.group("prefix"))
    return request.path


def rewritten_path(rule: mesh_pb2.HttpRouteRule, request: Request) -> str:
    """The path after the rule's rewrite (or redirect) path modifier: the matched prefix
    replaced without doubling or losing the ``/`` between it and the rest."""
    modifier = rule.redirect if rule.HasField("redirect") else rule.rewrite
    if modifier.path:
        return modifier.path
    if not modifier.prefix:
        return request.path
    prefix, replacement = matched_prefix(rule, request), modifier.prefix
    rest = request.path[len(prefix) :]
    if replacement.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    elif rest and not rest.startswith("/") and not replacement.endswith("/"):
        rest = "/" + rest
    return (replacement + rest) or "/"
