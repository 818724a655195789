"""Kubernetes objects as the API serves them (the fields translation reads)."""

from __future__ import annotations

from typing import Any

JsonObject = dict[str, Any]
AMBIENT = {"ambimesh.io/dataplane-mode": "ambient"}


def namespace(name: str, labels: dict[str, str] | None = None) -> JsonObject:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def node(name: str) -> JsonObject:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {}}


def pod(
    ns: str,
    name: str,
    ip: str,
    node_name: str = "node-1",
    labels: dict[str, str] | None = None,
    service_account: str = "default",
) -> JsonObject:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
        "spec": {
            "nodeName": node_name,
            "serviceAccountName": service_account,
            "containers": [
                {"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}
            ],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def service(ns: str, name: str, ip: str, selector: dict[str, str] | None) -> JsonObject:
    spec: JsonObject = {
        "clusterIP": ip,
        "clusterIPs": [ip],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}],
    }
    if selector is not None:
        spec["selector"] = selector
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def endpoint_slice(
    ns: str, name: str, service_name: str, endpoints: list[tuple[str, str, bool]]
) -> JsonObject:
    """``endpoints``: (pod name, pod IP, ready) each."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": not ready},
                "targetRef": {"kind": "Pod", "namespace": ns, "name": pod_name},
                "nodeName": "node-1",
            }
            for pod_name, ip, ready in endpoints
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }
