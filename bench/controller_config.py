"""The controller-at-scale bench's configuration: a YAML directory the files source reads.

One file per namespace (the Namespace, its pods, its services), so relabeling a
namespace rewrites one file. Pods are dealt round-robin over the nodes, so every node
hosts pods of many namespaces and a namespace's pods sit on many nodes. Pure: text in,
text out (tests/unit/test_bench_controller.py checks it through the real translation).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MODE_LABEL = "ambimesh.io/dataplane-mode"
POD_NET = ipaddress.IPv4Address("10.128.0.0")
SERVICE_NET = ipaddress.IPv4Address("10.96.0.0")
MAX_ADDRESSES = 1 << 16  # each network above is a /16


@dataclass(frozen=True)
class Shape:
    nodes: int
    pods: int
    namespaces: int
    pods_per_service: int = 10

    def __post_init__(self) -> None:
        if min(self.nodes, self.pods, self.namespaces, self.pods_per_service) < 1:
            raise ValueError(f"{self}: every count must be at least 1")
        if self.pods >= MAX_ADDRESSES - 1:
            raise ValueError(f"{self.pods} pods: at most {MAX_ADDRESSES - 2} (one /16)")

    def node_name(self, index: int) -> str:
        return f"node-{index:04d}"

    def namespace_name(self, index: int) -> str:
        return f"ns-{index:03d}"

    def file_name(self, index: int) -> str:
        return f"{self.namespace_name(index)}.yaml"

    def pods_of(self, namespace: int) -> range:
        """Pod numbers of namespace ``namespace`` (contiguous blocks, the first ones larger)."""
        share, extra = divmod(self.pods, self.namespaces)
        start = namespace * share + min(namespace, extra)
        return range(start, start + share + (namespace < extra))

    def node_of(self, pod: int) -> str:
        return self.node_name(pod % self.nodes)


def namespace_file(shape: Shape, namespace: int, mode: str) -> str:
    """Namespace ``namespace`` labelled ``dataplane-mode=mode``, its pods and services."""
    name = shape.namespace_name(namespace)
    labels = f"{{{MODE_LABEL}: {mode}}}"
    docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n"]
    pods = shape.pods_of(namespace)
    for pod in pods:
        app = f"app-{(pod - pods.start) // shape.pods_per_service}"
        docs.append(
            "apiVersion: v1\nkind: Pod\n"
            f"metadata: {{name: pod-{pod:05d}, namespace: {name}, labels: {{app: {app}}}}}\n"
            f"spec: {{nodeName: {shape.node_of(pod)}, serviceAccountName: {app}, "
            "containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}\n"
            f"status: {{podIP: {POD_NET + pod + 1}}}\n"
        )
    for index in range(-(-len(pods) // shape.pods_per_service)):
        vip = SERVICE_NET + pods.start + index + 1
        docs.append(
            "apiVersion: v1\nkind: Service\n"
            f"metadata: {{name: app-{index}, namespace: {name}}}\n"
            f"spec: {{selector: {{app: app-{index}}}, clusterIP: {vip}, "
            "ports: [{name: http, port: 80, targetPort: http}]}\n"
        )
    return "---\n".join(docs)


def config_files(shape: Shape, mode: str = "ambient") -> dict[str, str]:
    """File name -> text for the whole directory, every namespace labelled ``mode``."""
    return {shape.file_name(n): namespace_file(shape, n, mode) for n in range(shape.namespaces)}


def tokens_file(shape: Shape, secret: str) -> tuple[dict[str, str], str]:
    """(node -> join token, the tokens file's text); ``secret`` makes them this run's own."""
    tokens = {shape.node_name(n): f"{secret}-{n:04d}" for n in range(shape.nodes)}
    return tokens, "".join(f"{node}: {token}\n" for node, token in tokens.items())
