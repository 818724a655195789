"""Kubernetes-style objects -> mesh resources, with no I/O.

Both sources (the YAML directory and the Kubernetes API) hand the same plain dicts to
:func:`translate`, so one table of tests covers what users write. A malformed object of a
kind we understand is a :class:`ConfigError` naming where it came from, which object and
which field; the caller then keeps the last good configuration.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from controller import (
    authz,
    destinationrule,
    endpoints,
    httproute,
    ratelimit,
    virtualservice,
    waypoints,
)
from controller.addresses import Claim, conflict
from controller.fields import (
    ConfigObject,
    as_tuple,
    expected_name,
    port_number,
    string_map,
    tname,
)
from controller.hosts import ServiceIndex
from controller.l7 import L7Objects, l7_resources
from controller.quoting import clip, quote
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)

DATAPLANE_MODE_LABELS = ("ambimesh.io/dataplane-mode", "istio.io/dataplane-mode")
PEER_AUTHENTICATION_API_VERSIONS = ("security.istio.io/v1beta1", "security.istio.io/v1")

# The oneof field names of mesh_pb2.Resource double as the kind part of resource keys.
KIND_WORKLOAD = "workload"
KIND_SERVICE = "service"
KIND_PEER_AUTHENTICATION = "peer_authentication"
KIND_AUTHORIZATION_POLICY = "authorization_policy"
KIND_WAYPOINT = "waypoint"
# Kinds only waypoints use, by the apiVersions accepted for each.
_L7_KINDS: Mapping[str, tuple[str, ...]] = {
    waypoints.KIND: waypoints.API_VERSIONS,
    httproute.KIND: httproute.API_VERSIONS,
    virtualservice.KIND: virtualservice.API_VERSIONS,
    destinationrule.KIND: destinationrule.API_VERSIONS,
    ratelimit.KIND: ratelimit.API_VERSIONS,
}

_MTLS_MODES: Mapping[str, mesh_pb2.MtlsMode.ValueType] = {
    "UNSET": mesh_pb2.MTLS_MODE_UNSET,
    "PERMISSIVE": mesh_pb2.PERMISSIVE,
    "STRICT": mesh_pb2.STRICT,
    "DISABLE": mesh_pb2.DISABLE,
}
# Kubernetes' "safe" alphabet for generated name suffixes (pod-template-hash).
_REPLICASET_HASH = re.compile(r"-[bcdfghjklmnpqrstvwxz2456789]{5,10}$")
_POD_UID_NAMESPACE = uuid.UUID("6f0b3a53-2d1c-5c0e-9a7e-61a3b5c0d1e2")


class ConfigError(ValueError):
    """Configuration that cannot be applied; the message names source, object and field."""


@dataclass(frozen=True)
class SourcedObject:
    """One Kubernetes-style object and where it came from (e.g. ``dir/app.yaml#3``)."""

    obj: Mapping[str, Any]
    source: str


@dataclass(frozen=True)
class Settings:
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    cluster_domain: str = "cluster.local"


def resource_key(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name}"


def pod_uid(namespace: str, name: str) -> str:
    """The uid of a pod whose YAML carries no ``metadata.uid``.

    Deterministic (uuid5 of namespace/name) so that whoever builds the pod (the lab puts
    the uid in the pod's cgroup path) and the controller agree without talking.
    """
    return str(uuid.uuid5(_POD_UID_NAMESPACE, f"{namespace}/{name}"))


@dataclass
class _Obj:
    """One object being translated, with the context every error message needs."""

    raw: Mapping[str, Any]
    source: str
    kind: str
    namespace: str
    name: str

    def ref(self) -> str:
        """``Kind namespace/name``, the name cut short (it is user input of any length)."""
        name = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {clip(name)}"

    def describe(self) -> str:
        """``source: Kind namespace/name``, the prefix of every message about this object."""
        return f"{self.source}: {self.ref()}"

    def error(self, path: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.describe()}: {path}: {problem}")

    def get(self, path: str, expected: type | tuple[type, ...], default: Any = None) -> Any:
        """The value at dotted ``path``; ``default`` when absent, error when mistyped."""
        node: Any = self.raw
        walked: list[str] = []
        for part in path.split("."):
            if node is None:
                return default
            if not isinstance(node, Mapping):
                raise self.error(".".join(walked), f"must be a mapping, got {tname(node)}")
            walked.append(part)
            node = node.get(part)
        if node is None:
            return default
        if isinstance(node, bool) and bool not in as_tuple(expected):
            raise self.error(path, f"must be {expected_name(expected)}, got a boolean")
        if not isinstance(node, expected):
            raise self.error(path, f"must be {expected_name(expected)}, got {tname(node)}")
        return node

    def labels(self, path: str) -> dict[str, str]:
        return string_map(self, path, self.get(path, Mapping, {}))


@dataclass(eq=False)  # identity: the memo compares lists of pods by which pods they are
class _Pod:
    obj: _Obj
    labels: dict[str, str]
    uid: str
    workload: mesh_pb2.Workload | None
    container_ports: dict[str, int] = field(default_factory=dict)
    # What the last translation made of it, and in which context (see Memo).
    context: object = None
    resource: mesh_pb2.Resource | None = None
    claims: list[Claim] = field(default_factory=list)


@dataclass
class _Known:
    """An object as :func:`_identify` read it (None: a kind ambimesh ignores), and for a
    pod, as :func:`_read_pod` read it."""

    raw: Mapping[str, Any]
    source: str
    obj: _Obj | None
    pod: _Pod | None = None
    ident: tuple[str, str, str] = ("", "", "")

    def __post_init__(self) -> None:
        if self.obj is not None:
            self.ident = (self.obj.kind, self.obj.namespace, self.obj.name)


@dataclass(frozen=True)
class _ServiceDone:
    """A Service's translation and what it was made from: the same Service object, in the
    same context, selecting the same pods (a pod's workload or not is fixed by its object)
    gives the same result."""

    context: object
    selected: tuple[_Pod, ...]
    labels: object  # the namespace's label index it selected from
    resource: mesh_pb2.Resource
    selector: dict[str, str]
    claims: list[Claim]


class Memo:
    """What :func:`translate` reuses from its previous call, so a change costs work for the
    objects it touches, not for all 11,000 of a large mesh: every object as identified,
    each pod as read with its workload resource, each Service's resource and address
    claims, and each namespace's pods by label.

    An object is found by its identity: the sources hand over the same mapping while an
    object is unchanged and a new one when it changes (they never edit one in place). A
    result is reused only while everything it was made from is the same: for a workload,
    its context (settings, its namespace's labels, the declared waypoints); for a Service,
    that context and the pods it selects. Holds what the last successful call used only.
    """

    def __init__(self) -> None:
        self._known: dict[int, _Known] = {}
        self._next: dict[int, _Known] = {}
        self._services: dict[int, tuple[_Obj, _ServiceDone]] = {}
        self._next_services: dict[int, tuple[_Obj, _ServiceDone]] = {}
        self._labels: dict[str, tuple[list[_Pod], dict[tuple[str, str], list[_Pod]]]] = {}
        self._next_labels: dict[str, tuple[list[_Pod], dict[tuple[str, str], list[_Pod]]]] = {}
        self._contexts: dict[object, object] = {}
        self._next_contexts: dict[object, object] = {}

    def start(self) -> None:
        self._next, self._next_services, self._next_labels = {}, {}, {}
        self._next_contexts = {}

    def known(self, sourced: SourcedObject) -> _Known:
        found = self._known.get(id(sourced.obj))
        if found is None or found.raw is not sourced.obj or found.source != sourced.source:
            found = _Known(sourced.obj, sourced.source, _identify(sourced))
        self._next[id(sourced.obj)] = found
        return found

    def context(self, context: object) -> object:
        """``context``, or the equal one seen before: results are then reused after an
        identity check, not a comparison of settings, labels and waypoints per pod."""
        found = self._contexts.get(context, context)
        self._next_contexts[found] = found
        return found

    def service(self, obj: _Obj) -> _ServiceDone | None:
        found = self._services.get(id(obj))
        return found[1] if found is not None and found[0] is obj else None

    def keep_service(self, obj: _Obj, done: _ServiceDone) -> None:
        self._next_services[id(obj)] = (obj, done)

    def labels(self, namespace: str, pods: list[_Pod]) -> dict[tuple[str, str], list[_Pod]]:
        """The pods of ``namespace`` by (label, value), reused while they are the same pods."""
        found = self._labels.get(namespace)
        if found is None or found[0] != pods:
            by_label: dict[tuple[str, str], list[_Pod]] = {}
            for pod in pods:
                for label in pod.labels.items():
                    by_label.setdefault(label, []).append(pod)
            found = (pods, by_label)
        self._next_labels[namespace] = found
        return found[1]

    def done(self) -> None:
        """The translation succeeded: what it used is what the next one may reuse."""
        self._known, self._next = self._next, {}
        self._services, self._next_services = self._next_services, {}
        self._labels, self._next_labels = self._next_labels, {}
        self._contexts, self._next_contexts = self._next_contexts, {}


def translate(
    objects: Iterable[SourcedObject],
    settings: Settings | None = None,
    in_force: Mapping[str, mesh_pb2.Resource] | None = None,
    memo: Memo | None = None,
) -> dict[str, mesh_pb2.Resource]:
    """Every object the mesh understands, as resources keyed by ``<kind>/<ns>/<name>``.

    ``in_force``, the configuration now served, decides which of two objects claiming one
    address is the newcomer the error names (see :mod:`controller.addresses`). ``memo``
    carries work over from one call to the next (the controller keeps one).
    """
    settings = settings or Settings()
    memo = memo or Memo()
    memo.start()
    namespaces: dict[str, dict[str, str]] = {}
    pods: list[_Pod] = []
    services: list[_Obj] = []
    policies: list[_Obj] = []
    authorization_policies: list[_Obj] = []
    gateways: list[_Obj] = []
    slices: list[_Obj] = []
    l7 = L7Objects()
    seen: dict[tuple[str, str, str], str] = {}

    for sourced in objects:
        known = memo.known(sourced)
        obj = known.obj
        if obj is None:
            continue
        ident = known.ident
        if ident in seen:
            raise obj.error("metadata.name", f"defined twice (first in {seen[ident]})")
        seen[ident] = obj.source
        if obj.kind == "Namespace":
            namespaces[obj.name] = obj.labels("metadata.labels")
        elif obj.kind == "Pod":
            if known.pod is None:
                known.pod = _read_pod(obj)
            pods.append(known.pod)
        elif obj.kind == "Service":
            services.append(obj)
        elif obj.kind == authz.KIND:
            authorization_policies.append(obj)
        elif obj.kind == "PeerAuthentication":
            policies.append(obj)
        elif obj.kind == waypoints.KIND:
            gateways.append(obj)
        elif obj.kind == endpoints.KIND:
            slices.append(obj)
        else:
            _l7_list(l7, obj.kind).append(obj)
    declared = {wp.key: wp for g in gateways if (wp := waypoints.declared(g)) is not None}

    out: dict[str, mesh_pb2.Resource] = {}
    claims: list[Claim] = []
    waypoint_types = frozenset((key, wp.traffic_type) for key, wp in declared.items())
    contexts = {
        ns: memo.context((settings, tuple(sorted(labels.items())), waypoint_types))
        for ns, labels in namespaces.items()
    }
    no_namespace = memo.context((settings, (), waypoint_types))
    for pod in pods:
        context = contexts.get(pod.obj.namespace, no_namespace)
        if pod.context != context:
            _finish_workload(pod, namespaces.get(pod.obj.namespace, {}), settings, declared)
            pod.resource, pod.claims = _workload_resource(pod)
            pod.context = context
        if pod.resource is not None:
            out[pod.resource.key] = pod.resource
            claims += pod.claims
    by_key: dict[tuple[str, str], mesh_pb2.Service] = {}
    selectors: dict[tuple[str, str], dict[str, str]] = {}
    slices_of = endpoints.by_service(slices)
    index = _PodIndex(pods, memo)
    for svc in services:
        context = contexts.get(svc.namespace, no_namespace)
        svc_slices = slices_of.get((svc.namespace, svc.name))
        labels = index.labels(svc.namespace)
        done = memo.service(svc)
        if done is None or svc_slices is not None or done.labels is not labels:
            selector = string_map(svc, "spec.selector", svc.get("spec.selector", Mapping, {}))
            used = tuple(_selected(svc, index, svc_slices, selector))
        else:  # the same Service over the same label index selects the same pods
            selector, used = done.selector, done.selected
        if done is None or done.context != context or done.selected != used:
            service = _service(svc, used, namespaces.get(svc.namespace, {}), settings, declared)
            key = resource_key(KIND_SERVICE, svc.namespace, svc.name)
            resource = mesh_pb2.Resource(key=key, service=service)
            service_claims = _claims(svc, key, service.addresses, "spec.clusterIP")
            done = _ServiceDone(context, used, labels, resource, selector, service_claims)
        elif done.labels is not labels:
            done = replace(done, labels=labels)
        memo.keep_service(svc, done)
        out[done.resource.key] = done.resource
        claims += done.claims
        by_key[(svc.namespace, svc.name)] = done.resource.service
        selectors[(svc.namespace, svc.name)] = done.selector
    if (problem := conflict(claims, in_force or {})) is not None:
        raise ConfigError(problem)
    for pa in policies:
        policy = _peer_authentication(pa, settings)
        key = resource_key(KIND_PEER_AUTHENTICATION, pa.namespace, pa.name)
        out[key] = mesh_pb2.Resource(key=key, peer_authentication=policy)
    for ap in authorization_policies:
        authorization = authz.authorization_policy(ap, settings.root_namespace)
        if authorization is not None:
            key = resource_key(KIND_AUTHORIZATION_POLICY, ap.namespace, ap.name)
            out[key] = mesh_pb2.Resource(key=key, authorization_policy=authorization)
    in_use = {}
    for wp in declared.values():
        waypoint = _waypoint(wp, index.in_namespace(wp.obj.namespace), settings)
        in_use[f"{wp.obj.namespace}/{wp.obj.name}"] = waypoint
        key = resource_key(KIND_WAYPOINT, wp.obj.namespace, wp.obj.name)
        out[key] = mesh_pb2.Resource(key=key, waypoint=waypoint)
    l7.authorization_policies += authorization_policies
    service_index = ServiceIndex(by_key, settings.cluster_domain, selectors)
    for key, resource in l7_resources(l7, service_index, in_use).items():
        if key in out:
            raise ConfigError(
                f"{key}: generated to keep callers from bypassing a waypoint (see "
                "docs/waypoint.md), but an object of that name exists: rename it"
            )
        out[key] = resource
    memo.done()
    return out


def _workload_resource(pod: _Pod) -> tuple[mesh_pb2.Resource | None, list[Claim]]:
    if pod.workload is None:
        return None, []
    key = resource_key(KIND_WORKLOAD, pod.obj.namespace, pod.obj.name)
    host_network = pod.obj.get("spec.hostNetwork", bool, False)
    claims = _claims(pod.obj, key, pod.workload.addresses, "status.podIP", host_network)
    return mesh_pb2.Resource(key=key, workload=pod.workload), claims


def _l7_list(l7: L7Objects, kind: str) -> list[Any]:
    lists: dict[str, list[Any]] = {
        httproute.KIND: l7.routes.http_routes,
        virtualservice.KIND: l7.routes.virtual_services,
        destinationrule.KIND: l7.routes.destination_rules,
        ratelimit.KIND: l7.rate_limits,
    }
    return lists[kind]


class _PodIndex:
    """The pods by namespace, by (namespace, label, value) and by (namespace, name), built
    once per translation (each namespace's labels reused from ``memo`` while its pods are
    the same): matching every Service against every pod would cost services x pods (10
    million label checks for 10,000 pods and 1000 services)."""

    def __init__(self, pods: list[_Pod], memo: Memo) -> None:
        self._by_namespace: dict[str, list[_Pod]] = {}
        for pod in pods:
            self._by_namespace.setdefault(pod.obj.namespace, []).append(pod)
        self._by_label = {ns: memo.labels(ns, found) for ns, found in self._by_namespace.items()}
        self._pods = pods
        self._by_key: dict[tuple[str, str], _Pod] | None = None
        self._uids: dict[tuple[str, str], str] | None = None

    def in_namespace(self, namespace: str) -> list[_Pod]:
        return self._by_namespace.get(namespace, [])

    def labels(self, namespace: str) -> object:
        """The namespace's label index: the same object while its pods are the same."""
        return self._by_label.get(namespace)

    def selected(self, namespace: str, selector: Mapping[str, str]) -> list[_Pod]:
        """The pods of ``namespace`` whose labels include ``selector`` (none if empty)."""
        if not selector:
            return []
        first, *rest = selector.items()
        candidates = self._by_label.get(namespace, {}).get(first, [])
        return [p for p in candidates if all(p.labels.get(k) == v for k, v in rest)]

    def by_key(self) -> dict[tuple[str, str], _Pod]:
        if self._by_key is None:
            self._by_key = {(p.obj.namespace, p.obj.name): p for p in self._pods}
        return self._by_key

    def uids(self) -> dict[tuple[str, str], str]:
        if self._uids is None:
            self._uids = {key: p.uid for key, p in self.by_key().items()}
        return self._uids


def _waypoint(wp: waypoints.Declared, pods: list[_Pod], settings: Settings) -> mesh_pb2.Waypoint:
    """``pods``: those of the waypoint's namespace."""
    members = [
        waypoints.Member(
            pod.obj.ref(),
            pod.obj.get("spec.serviceAccountName", str, "") or "default",
            list(pod.workload.addresses) if pod.workload else [],
        )
        for pod in pods
        if pod.labels.get(waypoints.GATEWAY_NAME_LABEL) == wp.obj.name
    ]
    return waypoints.waypoint(wp, members, settings.trust_domain)


def _claims(
    obj: _Obj, key: str, addresses: Iterable[str], path: str, host_network: bool = False
) -> list[Claim]:
    return [Claim(ip, key, obj.ref(), obj.source, path, host_network) for ip in addresses]


def _identify(sourced: SourcedObject) -> _Obj | None:
    raw = sourced.obj
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{sourced.source}: expected a Kubernetes object (a mapping)")
    api_version, kind = raw.get("apiVersion"), raw.get("kind")
    known = (
        (api_version == "v1" and kind in ("Namespace", "Pod", "Service"))
        or (kind == "PeerAuthentication" and api_version in PEER_AUTHENTICATION_API_VERSIONS)
        or (kind == authz.KIND and api_version in authz.API_VERSIONS)
        or (kind == endpoints.KIND and api_version in endpoints.API_VERSIONS)
        or api_version in _L7_KINDS.get(str(kind), ())
    )
    if not known:
        log.debug(
            "%s: ignoring %s %s (not a kind ambimesh uses)",
            sourced.source,
            quote(api_version),
            quote(kind),
        )
        return None
    obj = _Obj(raw, sourced.source, str(kind), "", "?")
    obj.name = obj.get("metadata.name", str, "")
    if not obj.name:
        raise obj.error("metadata.name", "is required")
    if kind != "Namespace":
        obj.namespace = obj.get("metadata.namespace", str, "") or "default"
    return obj


def _read_pod(obj: _Obj) -> _Pod:
    uid = obj.get("metadata.uid", str, "") or pod_uid(obj.namespace, obj.name)
    pod = _Pod(obj=obj, labels=obj.labels("metadata.labels"), uid=uid, workload=None)
    for c_index, container in enumerate(obj.get("spec.containers", list, [])):
        if not isinstance(container, Mapping):
            raise obj.error(f"spec.containers[{c_index}]", "must be a mapping")
        for p_index, port in enumerate(container.get("ports") or []):
            where = f"spec.containers[{c_index}].ports[{p_index}]"
            if not isinstance(port, Mapping):
                raise obj.error(where, "must be a mapping")
            name = port.get("name")
            if name is not None and not isinstance(name, str):
                raise obj.error(f"{where}.name", f"must be a string, got {tname(name)}")
            if name is not None:
                pod.container_ports[name] = port_number(
                    obj, f"{where}.containerPort", port.get("containerPort")
                )
    return pod


def _finish_workload(
    pod: _Pod,
    ns_labels: Mapping[str, str],
    settings: Settings,
    declared: Mapping[tuple[str, str], waypoints.Declared],
) -> None:
    obj = pod.obj
    pod.workload = None
    node = obj.get("spec.nodeName", str, "")
    addresses = _pod_addresses(obj)
    if not node or not addresses:
        log.debug("%s: has no node or IP yet; not a workload", obj.describe())
        return
    # A waypoint's own pods speak HBONE themselves: never enrolled, never sent to a waypoint.
    serves_waypoint = waypoints.is_waypoint_pod(obj.namespace, pod.labels, declared)
    pod.workload = mesh_pb2.Workload(
        uid=pod.uid,
        name=obj.name,
        namespace=obj.namespace,
        service_account=obj.get("spec.serviceAccountName", str, "") or "default",
        node=node,
        addresses=addresses,
        ambient=not serves_waypoint and _ambient(obj, pod.labels, ns_labels),
        waypoint=""
        if serves_waypoint
        else waypoints.resolve(obj, "workload", pod.labels, ns_labels, declared),
        labels=pod.labels,
        trust_domain=settings.trust_domain,
        workload_name=_workload_name(obj, pod.labels),
    )


def _pod_addresses(obj: _Obj) -> list[str]:
    candidates: list[tuple[str, Any]] = [("status.podIP", obj.get("status.podIP", str, ""))]
    for index, entry in enumerate(obj.get("status.podIPs", list, [])):
        ip = entry.get("ip") if isinstance(entry, Mapping) else None
        candidates.append((f"status.podIPs[{index}].ip", ip))
    return _unique_ips(obj, candidates)


def _unique_ips(obj: _Obj, candidates: list[tuple[str, Any]]) -> list[str]:
    out: list[str] = []
    for path, value in candidates:
        if not value:
            continue
        if not isinstance(value, str):
            raise obj.error(path, f"must be a string, got {tname(value)}")
        try:
            ip = str(ipaddress.ip_address(value))
        except ValueError:
            raise obj.error(path, f"{quote(value)} is not an IP address") from None
        if ip not in out:
            out.append(ip)
    return out


def _label(
    names: tuple[str, ...], own: Mapping[str, str], ns: Mapping[str, str]
) -> tuple[str, str] | None:
    """(label name, value) from the object's own labels, else its namespace's."""
    for labels in (own, ns):
        for name in names:
            if name in labels:
                return name, labels[name]
    return None


def _ambient(obj: _Obj, labels: Mapping[str, str], ns_labels: Mapping[str, str]) -> bool:
    found = _label(DATAPLANE_MODE_LABELS, labels, ns_labels)
    if found is None:
        return False
    name, value = found
    if value not in ("ambient", "none"):
        where = "metadata.labels" if name in labels else f"namespace {obj.namespace} labels"
        raise obj.error(f"{where}[{name}]", f"{quote(value)} is not one of: ambient, none")
    return value == "ambient"


def _workload_name(obj: _Obj, labels: Mapping[str, str]) -> str:
    owners = obj.get("metadata.ownerReferences", list, [])
    owner = next((o for o in owners if isinstance(o, Mapping) and o.get("controller")), None)
    if owner is None and owners:
        owner = owners[0]
    if not isinstance(owner, Mapping) or not isinstance(owner.get("name"), str):
        return obj.name
    name: str = owner["name"]
    if owner.get("kind") == "ReplicaSet":
        template_hash = labels.get("pod-template-hash")
        if template_hash and name.endswith(f"-{template_hash}"):
            return name[: -len(template_hash) - 1]
        return _REPLICASET_HASH.sub("", name)
    return name


def _selected(
    obj: _Obj, pods: _PodIndex, slices: list[ConfigObject] | None, selector: Mapping[str, str]
) -> list[_Pod]:
    """The Service's endpoints: from its EndpointSlices when it has any (see
    :mod:`controller.endpoints`), else from its selector."""
    if slices is not None:
        by_key = pods.by_key()
        return [by_key[key] for key in endpoints.endpoint_pods(slices, pods.uids())]
    return pods.selected(obj.namespace, selector)


def _service(
    obj: _Obj,
    selected: Sequence[_Pod],
    ns_labels: Mapping[str, str],
    settings: Settings,
    declared: Mapping[tuple[str, str], waypoints.Declared],
) -> mesh_pb2.Service:
    candidates: list[tuple[str, Any]] = [("spec.clusterIP", obj.get("spec.clusterIP", str, ""))]
    for index, ip in enumerate(obj.get("spec.clusterIPs", list, [])):
        candidates.append((f"spec.clusterIPs[{index}]", ip))
    candidates = [(path, ip) for path, ip in candidates if ip != "None"]
    return mesh_pb2.Service(
        name=obj.name,
        namespace=obj.namespace,
        hostname=f"{obj.name}.{obj.namespace}.svc.{settings.cluster_domain}",
        addresses=_unique_ips(obj, candidates),
        ports=[
            port
            for i, raw in enumerate(obj.get("spec.ports", list, []))
            if (port := _service_port(obj, i, raw, selected)) is not None
        ],
        endpoint_uids=sorted(p.uid for p in selected if p.workload is not None),
        waypoint=waypoints.resolve(
            obj, "service", obj.labels("metadata.labels"), ns_labels, declared
        ),
    )


def _service_port(
    obj: _Obj, index: int, raw: Any, selected: Sequence[_Pod]
) -> mesh_pb2.ServicePort | None:
    """None for a named targetPort no selected pod declares (yet): like Kubernetes, the
    service then has no endpoints on that port, which is no reason to reject the config."""
    where = f"spec.ports[{index}]"
    if not isinstance(raw, Mapping):
        raise obj.error(where, "must be a mapping")
    port = port_number(obj, f"{where}.port", raw.get("port"))
    target = raw.get("targetPort", port)
    if isinstance(target, str) and not target.isdigit():
        numbers = {p.container_ports[target] for p in selected if target in p.container_ports}
        if not numbers:
            log.warning(
                "%s: %s.targetPort: no pod selected by the service declares a port named %s; "
                "the service has no endpoints on port %d until one does",
                obj.describe(),
                where,
                quote(target),
                port,
            )
            return None
        if len(numbers) != 1:
            raise obj.error(
                f"{where}.targetPort",
                f"named port {quote(target)}: selected pods disagree on its number "
                f"({sorted(numbers)}); ambimesh needs one number per service port: use a number",
            )
        target = numbers.pop()
    name = raw.get("name", "")
    if not isinstance(name, str):
        raise obj.error(f"{where}.name", f"must be a string, got {tname(name)}")
    return mesh_pb2.ServicePort(
        port=port, target_port=port_number(obj, f"{where}.targetPort", target), name=name
    )


def _peer_authentication(obj: _Obj, settings: Settings) -> mesh_pb2.PeerAuthentication:
    # As in Istio, an empty matchLabels is no selector: the policy covers the namespace.
    selector = string_map(
        obj, "spec.selector.matchLabels", obj.get("spec.selector.matchLabels", Mapping, {})
    )
    if selector:
        scope = mesh_pb2.WORKLOAD
    elif obj.namespace == settings.root_namespace:
        scope = mesh_pb2.MESH
    else:
        scope = mesh_pb2.NAMESPACE
    port_modes: dict[int, mesh_pb2.MtlsMode.ValueType] = {}
    port_level = obj.get("spec.portLevelMtls", Mapping, {})
    if port_level and not selector:
        raise obj.error(
            "spec.portLevelMtls", "requires spec.selector (as in Istio): add a workload selector"
        )
    for port, setting in port_level.items():
        where = f"spec.portLevelMtls[{clip(str(port))}]"
        number = port_number(obj, where, port)
        if not isinstance(setting, Mapping):
            raise obj.error(where, "must be a mapping with a mode")
        port_modes[number] = _mtls_mode(obj, f"{where}.mode", setting.get("mode"))
    return mesh_pb2.PeerAuthentication(
        name=obj.name,
        namespace=obj.namespace,
        scope=scope,
        selector=selector,
        mode=_mtls_mode(obj, "spec.mtls.mode", obj.get("spec.mtls.mode", str, None)),
        port_modes=port_modes,
    )


def _mtls_mode(obj: _Obj, path: str, value: Any) -> mesh_pb2.MtlsMode.ValueType:
    if value is None:
        return mesh_pb2.MTLS_MODE_UNSET
    if not isinstance(value, str) or value.upper() not in _MTLS_MODES:
        raise obj.error(path, f"{quote(value)} is not one of: {', '.join(_MTLS_MODES)}")
    return _MTLS_MODES[value.upper()]
