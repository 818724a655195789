"""HTTPRoutes, VirtualServices and DestinationRules -> the waypoint's per-Service-port route
tables (HttpRouteTable) and DestinationPolicies.

Conflicts are settled here, deterministically and with a warning:

- every HTTPRoute attached to a Service port is merged into one table in Gateway API
  precedence (httproute.py ranks the rules). A table for a port also holds the rules of
  routes attached to the whole Service; the waypoint uses the port's table, else the
  Service-wide one (port 0);
- a consumer route (an HTTPRoute in another namespace than its Service) comes first for
  clients of its namespace and replaces the producer's routes for them: its rules are
  limited to that source namespace and followed by a 404 for the rest of their requests;
- an HTTPRoute and a VirtualService for one Service: Istio calls mixing them undefined and
  recommends HTTPRoute for waypoints, so the HTTPRoutes win;
- two VirtualServices (or DestinationRules) for one Service: Istio merges those only for
  gateways; here the oldest (creationTimestamp, then ``namespace/name``) wins.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from controller import destinationrule, httproute, virtualservice
from controller.fields import ConfigObject, created
from controller.hosts import ServiceIndex, ServiceKey
from controller.route_parts import Attachment
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)

KIND_HTTP_ROUTES = "http_routes"
KIND_DESTINATION_POLICY = "destination_policy"
CONSUMER_MISS_STATUS = 404


@dataclass
class RouteObjects:
    http_routes: list[ConfigObject] = field(default_factory=list)
    virtual_services: list[ConfigObject] = field(default_factory=list)
    destination_rules: list[ConfigObject] = field(default_factory=list)


def route_resources(objects: RouteObjects, services: ServiceIndex) -> dict[str, mesh_pb2.Resource]:
    """HttpRouteTable and DestinationPolicy resources keyed ``<kind>/<ns>/<name>``."""
    out: dict[str, mesh_pb2.Resource] = {}
    policies = _destination_policies(objects.destination_rules, services)
    for _, policy in policies.values():
        dp_key = f"{KIND_DESTINATION_POLICY}/{policy.namespace}/{policy.name}"
        out[dp_key] = mesh_pb2.Resource(key=dp_key, destination_policy=policy)

    def subsets(key: ServiceKey) -> dict[str, dict[str, str]]:
        found = policies.get(key)
        return {} if found is None else {s.name: dict(s.labels) for s in found[1].subsets}

    by_service: dict[ServiceKey, list[Attachment]] = defaultdict(list)
    for obj in objects.http_routes:
        for attachment in httproute.attachments(obj, services):
            by_service[attachment.service].append(attachment)
    chosen_vs: dict[ServiceKey, Attachment] = {}
    for obj in objects.virtual_services:
        for attachment in virtualservice.attachments(obj, services, subsets):
            key = attachment.service
            if key in by_service:
                _warn_ignored(attachment, by_service[key][0], "an HTTPRoute is attached to it")
                continue
            other = chosen_vs.setdefault(key, attachment)
            if other is not attachment:
                older, newer = sorted((other, attachment), key=lambda a: a.age)
                chosen_vs[key] = older
                _warn_ignored(newer, older, "the older VirtualService wins")
    for key, attachment in chosen_vs.items():
        by_service[key].append(attachment)
    for key, attachments in by_service.items():
        for port, table in _tables(attachments):
            service = services.get(*key)
            assert service is not None  # attachments are made for existing Services only
            name = key[1] if port == 0 else f"{key[1]}:{port}"
            resource_key = f"{KIND_HTTP_ROUTES}/{key[0]}/{name}"
            table.service, table.service_namespace, table.port = service.hostname, key[0], port
            out[resource_key] = mesh_pb2.Resource(key=resource_key, http_routes=table)
    return out


def _destination_policies(
    objects: Iterable[ConfigObject], services: ServiceIndex
) -> dict[ServiceKey, tuple[tuple[Any, ...], mesh_pb2.DestinationPolicy]]:
    chosen: dict[ServiceKey, tuple[tuple[Any, ...], mesh_pb2.DestinationPolicy]] = {}
    for obj in objects:
        found = destinationrule.destination_policy(obj, services)
        if found is None:
            continue
        key, policy = found
        age = (created(obj), f"{obj.namespace}/{obj.name}")
        other = chosen.get(key)
        if other is None:
            chosen[key] = (age, policy)
        else:
            (_, older), (_, newer) = sorted((other, (age, policy)), key=lambda p: p[0])
            chosen[key] = (min(age, other[0]), older)
            log.warning(
                "DestinationRule %s/%s ignored for Service %s: DestinationRule %s/%s is older "
                "and also names it (Istio merges DestinationRules only for gateways)",
                newer.namespace,
                newer.name,
                policy.service,
                older.namespace,
                older.name,
            )
    return chosen


def _tables(attachments: list[Attachment]) -> Iterable[tuple[int, mesh_pb2.HttpRouteTable]]:
    ports = {a.port for a in attachments}
    for port in sorted(ports):
        members = [a for a in attachments if a.port in (port, 0)]
        yield port, _table(members)


def _table(attachments: list[Attachment]) -> mesh_pb2.HttpRouteTable:
    ranked = []
    for attachment in attachments:
        group = (0, attachment.consumer) if attachment.consumer else (1, "")
        ranked += [((group, rank), rule) for rank, rule in attachment.rules]
    ranked.sort(key=lambda item: item[0])
    table = mesh_pb2.HttpRouteTable(sources=sorted({a.source for a in attachments}))
    for index, ((group, _), rule) in enumerate(ranked):
        table.rules.append(rule)
        last_of_group = index + 1 == len(ranked) or ranked[index + 1][0][0] != group
        if group[0] == 0 and last_of_group:
            table.rules.append(_consumer_miss(group[1]))
    return table


def _consumer_miss(namespace: str) -> mesh_pb2.HttpRouteRule:
    """After a namespace's consumer routes: none matched, and producer routes do not apply."""
    return mesh_pb2.HttpRouteRule(
        name=f"{httproute.KIND}/{namespace}/consumer-routes-no-match",
        matches=[mesh_pb2.HttpRouteMatch(source_namespace=namespace)],
        direct_status=CONSUMER_MISS_STATUS,
    )


def _warn_ignored(ignored: Attachment, winner: Attachment, why: str) -> None:
    log.warning(
        "%s ignored for Service %s/%s: %s (%s)",
        ignored.source,
        *ignored.service,
        why,
        winner.source,
    )
