"""Route selection and the route's request edits, without I/O: which rule of an
`HttpRouteTable` a request takes, the path a rewrite or redirect produces, the backend a
weighted choice lands on. docs/waypoint.md "How the waypoint evaluates an HttpRouteTable"
is the contract; the unit tests pin each point of it."""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from mesh.api import mesh_pb2
from waypoint import headers as h
from waypoint.headers import Headers

_PSEUDO = (":authority", ":method", ":path", ":scheme")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class RouteInput:
    """What a route may look at."""

    method: str
    # The path as requested, query string included.
    target: str
    authority: str
    headers: Headers
    # The port the request came in on (the Service port).
    port: int
    scheme: str = "http"
    source_namespace: str = ""
    source_labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str) -> str | None:
        if name in _PSEUDO:
            return {
                ":authority": self.authority,
                ":method": self.method,
                ":path": self.target,
                ":scheme": self.scheme,
            }[name]
        if name == "host":
            return self.authority
        return h.joined(self.headers, name)


@dataclass(frozen=True)
class Selected:
    rule: mesh_pb2.HttpRouteRule
    # The part of the path a prefix rewrite or redirect replaces.
    prefix: str


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None  # the controller validates; a bad pattern here matches nothing


def string_matches(match: mesh_pb2.HttpStringMatch, value: str) -> bool:
    kind = match.WhichOneof("kind")
    if kind == "exact":
        return value == match.exact
    if kind == "prefix":
        return value.startswith(match.prefix)
    if kind == "regex":
        pattern = _regex(match.regex)
        return pattern is not None and pattern.fullmatch(value) is not None
    return True


def _path_prefix(match: mesh_pb2.HttpStringMatch, path: str) -> str | None:
    """None: no match. Otherwise the matched prefix (see the module docstring's contract)."""
    kind = match.WhichOneof("kind")
    if kind == "exact":
        return path if path == match.exact else None
    if kind == "prefix":
        return match.prefix if path.startswith(match.prefix) else None
    if kind == "regex":
        pattern = _regex(match.regex)
        found = pattern.fullmatch(path) if pattern is not None else None
        if found is None:
            return None
        if "prefix" in found.re.groupindex and found.group("prefix") is not None:
            return str(found.group("prefix"))
        return path
    return path


def _query_value(query: str, name: str) -> str | None:
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == name:
            return value
    return None


def match_prefix(match: mesh_pb2.HttpRouteMatch, req: RouteInput) -> str | None:
    """None if `match` does not hold for `req`, else the matched path prefix."""
    if match.method and match.method != req.method:
        return None
    if match.port and match.port != req.port:
        return None
    if match.source_namespace and match.source_namespace != req.source_namespace:
        return None
    if match.source_labels and any(
        req.source_labels.get(k) != v for k, v in match.source_labels.items()
    ):
        return None
    for header in match.headers:
        value = req.header(header.name.lower())
        holds = value is not None and string_matches(header.value, value)
        if holds == header.invert:
            return None
    if match.query_params:
        for param in match.query_params:
            value = _query_value(req.query, param.name)
            if value is None or not string_matches(param.value, value):
                return None
    if match.HasField("path"):
        return _path_prefix(match.path, req.path)
    return req.path


def select(table: mesh_pb2.HttpRouteTable, req: RouteInput) -> Selected | None:
    """The first rule with a match that holds (a rule without matches takes everything)."""
    for rule in table.rules:
        if not rule.matches:
            return Selected(rule, req.path)
        for match in rule.matches:
            prefix = match_prefix(match, req)
            if prefix is not None:
                return Selected(rule, prefix)
    return None


def replace_prefix(path: str, prefix: str, replacement: str) -> str:
    """Gateway API ReplacePrefixMatch: `path` starts with `prefix` (no query here)."""
    rest = path[len(prefix) :]
    if replacement.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    elif rest and not rest.startswith("/") and not replacement.endswith("/") and prefix:
        # A prefix that ended in "/" took the separator with it.
        rest = "/" + rest if prefix.endswith("/") else rest
    return (replacement + rest) or "/"


def _with_query(path: str, target: str) -> str:
    query = target.partition("?")[2]
    return f"{path}?{query}" if query else path


def rewritten_target(rewrite: mesh_pb2.HttpRewrite, req: RouteInput, prefix: str) -> str:
    if rewrite.path:
        return _with_query(rewrite.path, req.target)
    if rewrite.prefix:
        return _with_query(replace_prefix(req.path, prefix, rewrite.prefix), req.target)
    return req.target


def _split_authority(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        host, _, rest = authority.partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        host += "]"
    else:
        host, _, port = authority.rpartition(":") if ":" in authority else (authority, "", "")
    return host, int(port) if port.isdigit() else None


def redirect_location(redirect: mesh_pb2.HttpRedirect, req: RouteInput, prefix: str) -> str:
    scheme = redirect.scheme or req.scheme
    host, port = _split_authority(req.authority)
    if redirect.hostname:
        host = redirect.hostname
    if redirect.port:
        port = redirect.port
    elif redirect.scheme and redirect.scheme != req.scheme:
        port = None
    if port == _DEFAULT_PORTS.get(scheme):
        port = None
    if redirect.path:
        path = _with_query(redirect.path, req.target)
    elif redirect.prefix:
        path = _with_query(replace_prefix(req.path, prefix, redirect.prefix), req.target)
    else:
        path = req.target
    authority = f"{host}:{port}" if port else host
    return f"{scheme}://{authority}{path}"


def pick_backend(
    backends: Sequence[mesh_pb2.HttpBackend], rng: random.Random
) -> mesh_pb2.HttpBackend:
    """Weighted choice; weight 0 is never chosen unless every weight is 0 (then equal)."""
    total = sum(b.weight for b in backends)
    if total == 0:
        return backends[rng.randrange(len(backends))]
    point = rng.uniform(0, total)
    for backend in backends:
        point -= backend.weight
        if point < 0 and backend.weight:
            return backend
    return next(b for b in reversed(backends) if b.weight)
