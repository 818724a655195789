"""Waypoints: Gateways of a waypoint class, and which Services and pods use them.

A waypoint is declared the way Istio ambient declares one (a Gateway API ``Gateway`` of
class ``ambimesh-waypoint`` or ``istio-waypoint``) and served by the pods labelled
``gateway.networking.k8s.io/gateway-name: <gateway>``. Those pods speak HBONE themselves,
so they are never enrolled, and never sent through a waypoint.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controller.fields import ConfigObject
from controller.quoting import quote
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)

KIND = "Gateway"
API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
CLASSES = ("ambimesh-waypoint", "istio-waypoint")
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_FOR = ("ambimesh.io/waypoint-for", "istio.io/waypoint-for")
USE_WAYPOINT = ("ambimesh.io/use-waypoint", "istio.io/use-waypoint")
USE_WAYPOINT_NAMESPACE = ("ambimesh.io/use-waypoint-namespace", "istio.io/use-waypoint-namespace")
TRAFFIC_TYPES = ("service", "workload", "all", "none")
HBONE_PORT = 15008
# Which traffic_type values take traffic addressed to a Service / to a pod.
_TAKES = {"service": ("service", "all"), "workload": ("workload", "all")}


@dataclass(frozen=True)
class Declared:
    """A waypoint Gateway before its pods are known."""

    obj: ConfigObject
    traffic_type: str

    @property
    def key(self) -> tuple[str, str]:
        return self.obj.namespace, self.obj.name


@dataclass(frozen=True)
class Member:
    """A pod serving a waypoint: its service account and addresses, ``ref`` for errors."""

    ref: str
    service_account: str
    addresses: list[str]


def declared(obj: ConfigObject) -> Declared | None:
    """The waypoint a Gateway declares; None (logged) for a Gateway of another class."""
    class_name = obj.get("spec.gatewayClassName", str, "")
    if class_name not in CLASSES:
        log.debug(
            "%s: gatewayClassName %s is not a waypoint class (%s); ignored",
            obj.describe(),
            quote(class_name),
            ", ".join(CLASSES),
        )
        return None
    traffic_type = "service"
    for path in ("metadata.labels", "metadata.annotations"):
        values = obj.labels(path)
        found = next((name for name in WAYPOINT_FOR if name in values), None)
        if found is not None:
            traffic_type = values[found]
            if traffic_type not in TRAFFIC_TYPES:
                raise obj.error(
                    f"{path}[{found}]",
                    f"{quote(traffic_type)} is not one of: {', '.join(TRAFFIC_TYPES)}",
                )
            break
    return Declared(obj, traffic_type)


def is_waypoint_pod(
    namespace: str, labels: Mapping[str, str], waypoints: Mapping[tuple[str, str], Declared]
) -> bool:
    name = labels.get(GATEWAY_NAME_LABEL)
    return name is not None and (namespace, name) in waypoints


def waypoint(wp: Declared, members: Iterable[Member], trust_domain: str) -> mesh_pb2.Waypoint:
    """The waypoint with its pods' addresses and their one service account.

    Without pods (yet), the service account is the Gateway's name: what Istio's generated
    waypoint Deployment runs as.
    """
    addresses: list[str] = []
    accounts: dict[str, str] = {}
    for member in members:
        accounts.setdefault(member.service_account, member.ref)
        addresses += [ip for ip in member.addresses if ip not in addresses]
    if len(accounts) > 1:
        (one, first), (other, second) = list(accounts.items())[:2]
        raise wp.obj.error(
            "metadata.name",
            f"its pods run as different service accounts ({first}: {quote(one)}, "
            f"{second}: {quote(other)}); a waypoint has one identity: use one service account",
        )
    return mesh_pb2.Waypoint(
        name=wp.obj.name,
        namespace=wp.obj.namespace,
        addresses=addresses,
        service_account=next(iter(accounts), wp.obj.name),
        trust_domain=trust_domain,
        hbone_port=HBONE_PORT,
        traffic_type=wp.traffic_type,
    )


def resolve(
    obj: ConfigObject,
    traffic: str,
    own: Mapping[str, str],
    namespace_labels: Mapping[str, str],
    waypoints: Mapping[tuple[str, str], Declared],
) -> str:
    """``"<ns>/<name>"`` of the waypoint ``obj`` (a Service or pod) uses, else ``""``.

    The use-waypoint label on the object wins over its namespace's; ``none`` opts out. The
    ``use-waypoint-namespace`` label is read from the same place. A missing Gateway is a
    warning, not an error (Istio reports it in status): the traffic then goes direct.
    """
    for labels, inherited in ((own, False), (namespace_labels, True)):
        label = next((name for name in USE_WAYPOINT if name in labels), None)
        if label is None:
            continue
        name = labels[label]
        if name == "none":
            return ""
        ns_label = next((n for n in USE_WAYPOINT_NAMESPACE if n in labels), None)
        namespace = labels[ns_label] if ns_label else obj.namespace
        wp = waypoints.get((namespace, name))
        where = f"namespace {obj.namespace} label" if inherited else "label"
        if wp is None:
            log.warning(
                "%s: %s %s: no waypoint Gateway %s/%s (class %s); traffic goes direct",
                obj.describe(),
                where,
                label,
                namespace,
                quote(name),
                " or ".join(CLASSES),
            )
            return ""
        if wp.traffic_type not in _TAKES[traffic]:
            (log.debug if inherited else log.warning)(
                "%s: %s %s: waypoint %s/%s is for %s traffic, not %s traffic; not used",
                obj.describe(),
                where,
                label,
                namespace,
                name,
                wp.traffic_type,
                traffic,
            )
            return ""
        return f"{namespace}/{name}"
    return ""
