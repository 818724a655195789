"""Envoy's response flags: the short codes Istio puts in ``response_flags`` (metrics and
access logs), so dashboards and alerts written for an Envoy waypoint read ours unchanged.

One place for the whole waypoint: the resilience modules say which flag their refusal
means, the request path collects the flags of a request and :func:`join` renders them.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

NONE = "-"


class ResponseFlag(StrEnum):
    """The codes a waypoint can produce, in Envoy's order (``ResponseFlagUtils``), which is
    the order :func:`join` writes them in."""

    NO_HEALTHY_UPSTREAM = "UH"  # every endpoint ejected (or none): 503
    UPSTREAM_REQUEST_TIMEOUT = "UT"  # route timeout: 504
    LOCAL_RESET = "LR"
    UPSTREAM_REMOTE_RESET = "UR"
    UPSTREAM_CONNECTION_FAILURE = "UF"  # could not connect to the endpoint: 503
    UPSTREAM_CONNECTION_TERMINATION = "UC"  # the endpoint closed mid-response
    UPSTREAM_OVERFLOW = "UO"  # circuit breaker open: 503
    NO_ROUTE_FOUND = "NR"  # no route / no such service: 404 (or 503 for a backend-less route)
    DELAY_INJECTED = "DI"  # fault injection delayed the request
    FAULT_INJECTED = "FI"  # fault injection aborted the request
    RATE_LIMITED = "RL"  # local rate limit: 429
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"  # the caller went away first
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"  # retries (or connect attempts) used up


_ORDER = {flag: i for i, flag in enumerate(ResponseFlag)}


def join(flags: Iterable[ResponseFlag]) -> str:
    """Envoy's ``%RESPONSE_FLAGS%``: comma separated in Envoy's order, ``-`` for none."""
    unique = sorted(set(flags), key=_ORDER.__getitem__)
    return ",".join(unique) if unique else NONE
