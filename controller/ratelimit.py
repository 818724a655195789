"""ambimesh's own ``RateLimit`` (``ambimesh.io/v1alpha1``) -> a waypoint token bucket.

Istio has no local rate limit API short of EnvoyFilter, so this small kind says it:
``targetRef`` a Service, ``requests`` per ``per`` duration, ``burst`` (default
``requests``) tokens at most. Each waypoint replica keeps its own bucket per Service.
"""

from __future__ import annotations

import logging

from controller.fields import ConfigObject, View
from controller.hosts import ServiceIndex
from controller.quoting import quote
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)

KIND = "RateLimit"
API_VERSIONS = ("ambimesh.io/v1alpha1",)
_MAX = 2**32 - 1


def rate_limit(obj: ConfigObject, services: ServiceIndex) -> mesh_pb2.RateLimit | None:
    """The limit, or None (logged) when its target Service does not exist."""
    spec = View.of(obj, "spec")
    spec.check_fields(("targetRef", "requests", "per", "burst"))
    target = spec.view("targetRef")
    if target is None:
        raise spec.error("targetRef", "is required (kind: Service, name: <service>)")
    target.check_fields(("group", "kind", "name"))
    if target.string("kind", "Service") != "Service" or target.string("group") not in ("", "core"):
        raise target.error("kind", "must be Service")
    name = target.string("name", required=True)
    requests = spec.integer("requests", 0, 1, _MAX)
    if not requests:
        raise spec.error("requests", "is required (a positive integer)")
    per = spec.duration("per")
    if not per:
        raise spec.error("per", "is required (a duration above 0, e.g. 1s, 1m)")
    service = services.get(obj.namespace, name)
    if service is None:
        log.warning(
            "%s: no Service %s/%s; no limit applied", obj.describe(), obj.namespace, quote(name)
        )
        return None
    return mesh_pb2.RateLimit(
        service=service.hostname,
        name=obj.name,
        namespace=obj.namespace,
        requests=requests,
        per_seconds=per,
        burst=spec.integer("burst", requests, 1, _MAX),
    )
