"""Builders for the Kubernetes-style objects the L7 translation tests feed to translate()."""

from __future__ import annotations

import itertools
from typing import Any

from controller.translate import SourcedObject, translate
from mesh.api import mesh_pb2

NS = "demo"
_ips = (f"10.96.{n // 250}.{n % 250 + 1}" for n in itertools.count())
_pod_ips = (f"10.1.{n // 250}.{n % 250 + 1}" for n in itertools.count())


def service(
    name: str,
    ns: str = NS,
    ports: tuple[int, ...] = (80, 8080),
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {
            "selector": {"app": name},
            "clusterIP": next(_ips),
            "ports": [{"name": f"http-{p}", "port": p} for p in ports],
        },
    }


def pod(
    name: str, ns: str = NS, labels: dict[str, str] | None = None, sa: str = "default"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": "node-a", "serviceAccountName": sa},
        "status": {"podIP": next(_pod_ips)},
    }


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    }


def gateway(
    name: str, ns: str = NS, waypoint_for: str | None = None, cls: str = "istio-waypoint"
) -> dict[str, Any]:
    labels = {"istio.io/waypoint-for": waypoint_for} if waypoint_for else {}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "gatewayClassName": cls,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def http_route(
    name: str,
    rules: list[dict[str, Any]],
    parent: str = "echo",
    port: int | None = None,
    ns: str = NS,
    parent_ns: str | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    ref: dict[str, Any] = {"group": "", "kind": "Service", "name": parent}
    if port:
        ref["port"] = port
    if parent_ns:
        ref["namespace"] = parent_ns
    metadata: dict[str, Any] = {"name": name, "namespace": ns}
    if created:
        metadata["creationTimestamp"] = created
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": metadata,
        "spec": {"parentRefs": [ref], "rules": rules},
    }


def rule(
    *matches: dict[str, Any], to: list[dict[str, Any]] | None = None, **extra: Any
) -> dict[str, Any]:
    out: dict[str, Any] = dict(extra)
    if matches:
        out["matches"] = list(matches)
    if to is not None:
        out["backendRefs"] = to
    return out


def match(
    path: str | None = None,
    kind: str = "PathPrefix",
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    method: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if path is not None:
        out["path"] = {"type": kind, "value": path}
    if headers:
        out["headers"] = [{"name": k, "value": v} for k, v in headers.items()]
    if query:
        out["queryParams"] = [{"name": k, "value": v} for k, v in query.items()]
    if method:
        out["method"] = method
    return out


def backend(name: str, port: int = 8080, weight: int | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": port, **extra}
    if weight is not None:
        out["weight"] = weight
    return out


def run(*objects: dict[str, Any]) -> dict[str, mesh_pb2.Resource]:
    return translate([SourcedObject(o, f"cfg.yaml#{i + 1}") for i, o in enumerate(objects)])


def table(
    out: dict[str, mesh_pb2.Resource], service_name: str = "echo", port: int = 0, ns: str = NS
) -> mesh_pb2.HttpRouteTable:
    name = service_name if port == 0 else f"{service_name}:{port}"
    return out[f"http_routes/{ns}/{name}"].http_routes


def echo_services(ns: str = NS) -> list[dict[str, Any]]:
    return [service(name, ns) for name in ("echo", "echo-v1", "echo-v2", "echo-v3")]
