"""The waypoints' resources (Resource fields 6-10), once Services and waypoints are known:
route tables and destination policies (routes.py), rate limits, L7 authorization and the
L4 policies that keep callers from bypassing a waypoint."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from controller import ratelimit, routes, waypoint_authz
from controller.fields import ConfigObject
from controller.hosts import ServiceIndex
from mesh.api import mesh_pb2

KIND_RATE_LIMIT = "rate_limit"
KIND_AUTHORIZATION_POLICY = "authorization_policy"


@dataclass
class L7Objects:
    routes: routes.RouteObjects = field(default_factory=routes.RouteObjects)
    rate_limits: list[ConfigObject] = field(default_factory=list)
    authorization_policies: list[ConfigObject] = field(default_factory=list)


def l7_resources(
    objects: L7Objects,
    services: ServiceIndex,
    waypoints: Mapping[str, mesh_pb2.Waypoint],
) -> dict[str, mesh_pb2.Resource]:
    """Resources keyed ``<kind>/<ns>/<name>``; ``waypoints`` by ``"<ns>/<name>"``."""
    out = routes.route_resources(objects.routes, services)
    for obj in objects.rate_limits:
        limit = ratelimit.rate_limit(obj, services)
        if limit is not None:
            key = f"{KIND_RATE_LIMIT}/{obj.namespace}/{obj.name}"
            out[key] = mesh_pb2.Resource(key=key, rate_limit=limit)
    http_policies = []
    for obj in objects.authorization_policies:
        policy = waypoint_authz.http_authorization_policy(obj)
        if policy is not None:
            http_policies.append(policy)
            key = f"{waypoint_authz.KIND_HTTP_AUTHORIZATION_POLICY}/{obj.namespace}/{obj.name}"
            out[key] = mesh_pb2.Resource(key=key, http_authorization_policy=policy)
    for bypass in waypoint_authz.bypass_policies(http_policies, services, waypoints):
        key = f"{KIND_AUTHORIZATION_POLICY}/{bypass.namespace}/{bypass.name}"
        out[key] = mesh_pb2.Resource(key=key, authorization_policy=bypass)
    return out
