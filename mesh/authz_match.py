"""The value matchers of Istio's AuthorizationPolicy, shared by the two enforcers that must
agree on them: ztunnel (L4, per connection) and the waypoint (L7, per request).

A condition holds when any of its values matches and none of its ``not`` values does; an
absent attribute (no principal on a plaintext connection, a missing header) matches no
value, so only the ``not`` forms hold for it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TypeVar

from mesh.api import mesh_pb2

T = TypeVar("T")


def holds(positive: Sequence[T], negative: Sequence[T], test: Callable[[T], bool]) -> bool:
    """No values, or one of them matches; and none of the ``not`` values matches."""
    return (not positive or any(map(test, positive))) and not any(map(test, negative))


def string_matches(
    match: mesh_pb2.StringMatch, value: str | None, *, ignore_case: bool = False
) -> bool:
    """Istio's ``exact``, ``prefix*``, ``*suffix`` and ``*`` (any non-empty value);
    ``ignore_case`` for hosts, which Istio matches case-insensitively."""
    if not value:
        return False
    kind = match.WhichOneof("kind")
    if kind == "presence":
        return True
    pattern: str = getattr(match, kind) if kind else ""
    if ignore_case:
        value, pattern = value.lower(), pattern.lower()
    if kind == "exact":
        return value == pattern
    if kind == "prefix":
        return value.startswith(pattern)
    return kind == "suffix" and value.endswith(pattern)


def in_cidr(address: str) -> Callable[[str], bool]:
    """A test of ``address`` against one CIDR (a bare address is a /32 or /128)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # no address known: no CIDR contains it
        return lambda cidr: False
    return lambda cidr: ip in _network(cidr)


@lru_cache(maxsize=4096)
def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(cidr, strict=False)
