"""What HTTPRoute and VirtualService translation share: the rule record routes.py sorts,
Istio's default retry policy, and checked string matches."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from controller.fields import View
from controller.hosts import ServiceKey
from controller.quoting import quote
from mesh.api import mesh_pb2

# Istio's default for a route that says nothing about retries (istiod retry.DefaultPolicy:
# num_retries 2 on connect-failure,refused-stream,unavailable,cancelled), applied by
# waypoints as by sidecars. Since Istio 1.24 an application's 503 is not retried by default
# (istio/istio#52111, EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY): a 503 may have done its work.
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled")
DEFAULT_RETRY_ATTEMPTS = 2
DEFAULT_RETRIABLE_CODES: tuple[int, ...] = ()
# Envoy's retry back-off: 25 ms base, at most 10 times that.
BACKOFF_BASE_SECONDS = 0.025
BACKOFF_MAX_SECONDS = 0.25


@dataclass
class Attachment:
    """Rules for one Service port (0: every port), from one HTTPRoute or VirtualService.

    ``rank`` orders rules across all attachments of a Service port (routes.py sorts on it);
    ``consumer`` is the client namespace a consumer HTTPRoute is limited to; ``age``
    (creation time, ``namespace/name``) picks the oldest of conflicting VirtualServices.
    """

    source: str
    service: ServiceKey
    port: int
    rules: list[tuple[tuple[Any, ...], mesh_pb2.HttpRouteRule]] = field(default_factory=list)
    consumer: str = ""
    age: tuple[Any, ...] = ()


def default_retry(
    attempts: int = DEFAULT_RETRY_ATTEMPTS,
    retry_on: tuple[str, ...] = DEFAULT_RETRY_ON,
    codes: tuple[int, ...] = DEFAULT_RETRIABLE_CODES,
) -> mesh_pb2.HttpRetry:
    if attempts == 0:
        return mesh_pb2.HttpRetry()
    if codes:
        retry_on += ("retriable-status-codes",)
    return mesh_pb2.HttpRetry(
        attempts=attempts,
        retry_on=retry_on,
        retriable_status_codes=codes,
        backoff_base_seconds=BACKOFF_BASE_SECONDS,
        backoff_max_seconds=BACKOFF_MAX_SECONDS,
    )


def regex(view: View, key: str, value: str) -> str:
    """``value`` checked to compile (the waypoint full-matches it with Python ``re``)."""
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as error:
        raise view.error(
            key, f"{quote(value)} is not a valid regular expression: {error}"
        ) from None
    return value


def string_match(view: View, key: str, kinds: tuple[str, ...]) -> mesh_pb2.HttpStringMatch:
    """An Istio StringMatch (``{exact|prefix|regex: value}``) at ``view.key``.

    An empty one (``{}``) matches any value, as Istio reads a header match without a value.
    """
    match = view.view(key)
    if match is None:
        raise view.error(key, "must be a mapping with one of: " + ", ".join(kinds))
    return string_match_at(match, kinds)


def string_match_at(match: View, kinds: tuple[str, ...]) -> mesh_pb2.HttpStringMatch:
    """The Istio StringMatch ``match`` (see :func:`string_match`)."""
    match.check_fields(kinds)
    set_kinds = [kind for kind in kinds if match.has(kind)]
    if len(set_kinds) > 1:
        raise match.error("", f"set only one of: {', '.join(set_kinds)}")
    if not set_kinds:
        return mesh_pb2.HttpStringMatch(regex=".*")
    kind = set_kinds[0]
    value = match.string(kind, required=kind != "exact")
    if kind == "regex":
        return mesh_pb2.HttpStringMatch(regex=regex(match, kind, value))
    return mesh_pb2.HttpStringMatch(**{kind: value})
