"""The lab's plan: which namespaces, addresses, cgroups and processes a YAML directory means.

Pure: it reads Kubernetes-style objects and decides everything the lab builds, the way a
scheduler, kubelet and CNI would (pod IPs, UIDs, service VIPs), so the I/O side only
executes the plan and tests can check it without privileges.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FABRIC_NET = ipaddress.IPv4Network("198.18.0.0/24")
SERVICE_NET = ipaddress.IPv4Network("198.18.128.0/24")
POD_SUPERNET = ipaddress.IPv4Network("198.19.0.0/16")
CONTROLLER_PORT = 15012
CLUSTER_DOMAIN = "cluster.local"
MAX_NODES = 200
MAX_PODS_PER_NODE = 240

Document = dict[str, Any]


# Istio's label on waypoint pods; the lab starts the waypoint proxy in such a pod.
WAYPOINT_LABEL = "gateway.networking.k8s.io/gateway-name"


class PlanError(ValueError):
    """The lab's YAML cannot be built; the message names the object and field."""


@dataclass(frozen=True)
class NodePlan:
    name: str
    netns: str
    address: str
    pod_cidr: str
    gateway: str
    fabric_veth: str


@dataclass(frozen=True)
class PodPlan:
    name: str
    namespace: str
    uid: str
    node: str
    netns: str
    address: str
    host_veth: str
    commands: tuple[tuple[str, ...], ...]
    ports: tuple[int, ...] = ()
    service_account: str = "default"
    # The Gateway this pod is an instance of: the lab runs the waypoint proxy in it, with
    # its container's `args` appended to the proxy's command line.
    waypoint: str = ""
    waypoint_args: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class ServicePlan:
    name: str
    namespace: str
    vip: str
    ports: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class LabPlan:
    lab: str
    fabric_netns: str
    controller_address: str
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    services: tuple[ServicePlan, ...]
    runtime_documents: Mapping[str, list[Document]] = field(default_factory=dict)

    @property
    def controller_target(self) -> str:
        return f"{self.controller_address}:{CONTROLLER_PORT}"

    def node(self, name: str) -> NodePlan:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def pod(self, ref: str) -> PodPlan:
        """Find a pod by ``namespace/name`` or by a name that is unique across namespaces."""
        matches = [p for p in self.pods if ref in (p.ref, p.name)]
        if len(matches) != 1:
            known = ", ".join(p.ref for p in self.pods)
            why = "is ambiguous" if matches else "is not a pod of this lab"
            raise KeyError(f"{ref!r} {why}; pods: {known}")
        return matches[0]

    def hosts_file(self, pod: PodPlan) -> str:
        """/etc/hosts for a pod: itself plus every Service, short names in its namespace."""
        lines = ["127.0.0.1 localhost", f"{pod.address} {pod.name}"]
        for svc in self.services:
            names = [f"{svc.name}.{svc.namespace}", f"{svc.name}.{svc.namespace}.svc"]
            names.append(f"{svc.name}.{svc.namespace}.svc.{CLUSTER_DOMAIN}")
            if svc.namespace == pod.namespace:
                names.insert(0, svc.name)
            lines.append(f"{svc.vip} {' '.join(names)}")
        return "\n".join(lines) + "\n"


def _where(source: str, doc: Document) -> str:
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace", "")
    name = meta.get("name", "?")
    return f"{source}: {doc.get('kind')} {ns + '/' if ns else ''}{name}"


def _name(source: str, doc: Document) -> str:
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        raise PlanError(f"{_where(source, doc)}: metadata.name is missing")
    return name


def plan(
    lab: str,
    files: Mapping[str, list[Document]],
    new_uid: Callable[[], str],
) -> LabPlan:
    """Lay out the lab described by ``files`` (file name -> YAML documents).

    Pods get IPs from their node's /24 and a fresh UID; Services without a clusterIP get a
    VIP. Both are written into ``runtime_documents`` so the controller sees what a
    Kubernetes API server would report.
    """
    runtime = {fname: [copy.deepcopy(d) for d in docs if d] for fname, docs in files.items()}
    everything = [(fname, d) for fname, docs in runtime.items() for d in docs]

    node_docs = [(f, d) for f, d in everything if d.get("kind") == "Node"]
    if not node_docs:
        raise PlanError("the lab needs at least one Node object")
    nodes: list[NodePlan] = []
    for index, (source, doc) in enumerate(node_docs, start=1):
        name = _name(source, doc)
        if "." in name or name == "fabric" or index > MAX_NODES:
            # Pod netns names carry a dot (namespace.name) and the fabric has its own.
            raise PlanError(
                f"{_where(source, doc)}: the lab takes up to {MAX_NODES} nodes "
                "named without dots and other than 'fabric'"
            )
        cidr = list(POD_SUPERNET.subnets(new_prefix=24))[index]
        nodes.append(
            NodePlan(
                name=name,
                netns=f"{lab}-{name}",
                address=str(FABRIC_NET[10 + index]),
                pod_cidr=str(cidr),
                gateway=str(cidr[1]),
                fabric_veth=f"fab{index}",
            )
        )
    by_node = {n.name: n for n in nodes}

    pods: list[PodPlan] = []
    per_node: dict[str, int] = {}
    for source, doc in ((f, d) for f, d in everything if d.get("kind") == "Pod"):
        pods.append(_plan_pod(lab, source, doc, by_node, per_node, new_uid))

    services: list[ServicePlan] = []
    for index, (source, doc) in enumerate(
        ((f, d) for f, d in everything if d.get("kind") == "Service"), start=10
    ):
        services.append(_plan_service(source, doc, str(SERVICE_NET[index])))

    return LabPlan(
        lab=lab,
        fabric_netns=f"{lab}-fabric",
        controller_address=str(FABRIC_NET[1]),
        nodes=tuple(nodes),
        pods=tuple(pods),
        services=tuple(services),
        runtime_documents=runtime,
    )


def _plan_pod(
    lab: str,
    source: str,
    doc: Document,
    nodes: Mapping[str, NodePlan],
    per_node: dict[str, int],
    new_uid: Callable[[], str],
) -> PodPlan:
    name = _name(source, doc)
    meta = doc.setdefault("metadata", {})
    namespace = meta.setdefault("namespace", "default")
    spec = doc.get("spec") or {}
    node_name = spec.get("nodeName")
    if not isinstance(node_name, str) or node_name not in nodes:
        raise PlanError(
            f"{_where(source, doc)}: spec.nodeName {node_name!r} is not one of the lab's "
            f"nodes ({', '.join(nodes)})"
        )
    node = nodes[node_name]
    index = per_node.get(node.name, 0)
    per_node[node.name] = index + 1
    if index >= MAX_PODS_PER_NODE:
        raise PlanError(
            f"{_where(source, doc)}: node {node.name} already has "
            f"{MAX_PODS_PER_NODE} pods, the most its /24 holds"
        )
    address = str(ipaddress.IPv4Network(node.pod_cidr)[10 + index])
    uid = meta.setdefault("uid", new_uid())
    doc["status"] = {"podIP": address, "podIPs": [{"ip": address}], "hostIP": node.address}
    commands: list[tuple[str, ...]] = []
    ports: list[int] = []
    waypoint = (meta.get("labels") or {}).get(WAYPOINT_LABEL, "")
    for i, container in enumerate([] if waypoint else spec.get("containers") or []):
        command = container.get("command") or []
        args = container.get("args") or []
        argv = command + args if isinstance(command, list) and isinstance(args, list) else []
        if not argv or not all(isinstance(c, str) for c in argv):
            raise PlanError(
                f"{_where(source, doc)}: spec.containers[{i}].command must be a list of strings"
            )
        commands.append(tuple(argv))
        ports.extend(
            p["containerPort"] for p in container.get("ports") or [] if "containerPort" in p
        )
    return PodPlan(
        name=name,
        namespace=namespace,
        uid=uid,
        node=node.name,
        netns=f"{lab}-{namespace}.{name}",
        address=address,
        host_veth=f"vp{node.name[-4:].replace('-', '')}{index}",
        commands=tuple(commands),
        ports=tuple(ports),
        service_account=spec.get("serviceAccountName") or "default",
        waypoint=waypoint,
        waypoint_args=_waypoint_args(source, doc) if waypoint else (),
    )


def _waypoint_args(source: str, doc: Document) -> tuple[str, ...]:
    containers = (doc.get("spec") or {}).get("containers") or [{}]
    first = containers[0] if isinstance(containers, list) else None
    args = (first.get("args") or []) if isinstance(first, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise PlanError(f"{_where(source, doc)}: spec.containers[0].args must be a list of strings")
    return tuple(args)


def _plan_service(source: str, doc: Document, default_vip: str) -> ServicePlan:
    name = _name(source, doc)
    namespace = doc.setdefault("metadata", {}).setdefault("namespace", "default")
    spec = doc.setdefault("spec", {})
    vip = spec.setdefault("clusterIP", default_vip)
    ports: list[tuple[int, int]] = []
    for i, port in enumerate(spec.get("ports") or []):
        number = port.get("port")
        target = port.get("targetPort", number)
        if not isinstance(number, int):
            raise PlanError(f"{_where(source, doc)}: spec.ports[{i}].port must be a number")
        ports.append((number, target if isinstance(target, int) else number))
    return ServicePlan(name=name, namespace=namespace, vip=vip, ports=tuple(ports))


SCALE_NAMESPACE = "scale"
SCALE_FILE = "zz-scale-pods.yaml"
# Pods share service accounts as a Deployment's replicas do: ztunnel keeps one certificate
# and TLS context per identity, so identities, not pods, set that part of its memory.
SCALE_PODS_PER_IDENTITY = 10


def scale_documents(files: Mapping[str, list[Document]], count: int) -> list[Document]:
    """``count`` extra enrolled pods for ``files``' nodes: namespace ``scale`` (ambient),
    pods ``pod-000``... dealt round-robin over the nodes in file order, a service account
    per :data:`SCALE_PODS_PER_IDENTITY` pods. No containers: each is a netns, a cgroup and
    the lab's pause process, cheap enough for hundreds; whoever needs a server in one
    starts it (``Lab.spawn_in_pod``)."""
    if count < 0:
        raise PlanError(f"scale pods: {count} is not a pod count")
    nodes = [
        name
        for docs in files.values()
        for d in docs
        if d.get("kind") == "Node"
        and isinstance(name := (d.get("metadata") or {}).get("name"), str)
    ]
    if count and not nodes:
        raise PlanError("scale pods need at least one Node object")
    if not count:
        return []
    width = max(3, len(str(count - 1)))
    accounts = [f"sa-{i:0{width}d}" for i in range(0, count, SCALE_PODS_PER_IDENTITY)]
    docs: list[Document] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": SCALE_NAMESPACE,
                "labels": {"ambimesh.io/dataplane-mode": "ambient"},
            },
        }
    ]
    docs += [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": SCALE_NAMESPACE},
        }
        for account in accounts
    ]
    for i in range(count):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"pod-{i:0{width}d}",
                    "namespace": SCALE_NAMESPACE,
                    "labels": {"app": "scale"},
                },
                "spec": {
                    "nodeName": nodes[i % len(nodes)],
                    "serviceAccountName": accounts[i // SCALE_PODS_PER_IDENTITY],
                },
            }
        )
    return docs


def documents_of(files: Iterable[tuple[str, str]]) -> dict[str, list[Document]]:
    """Parse YAML texts (file name, text) into documents, naming the file on error."""
    import yaml

    out: dict[str, list[Document]] = {}
    for fname, text in files:
        try:
            docs = [d for d in yaml.safe_load_all(text) if d]
        except yaml.YAMLError as exc:
            raise PlanError(f"{fname}: not valid YAML: {exc}") from exc
        for d in docs:
            if not isinstance(d, dict):
                raise PlanError(f"{fname}: every document must be a mapping")
        out[fname] = docs
    return out
