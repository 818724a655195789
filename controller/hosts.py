"""Service names as users write them in routes and policies, resolved to mesh Services.

Istio reads ``reviews`` (in the referring object's namespace), ``reviews.prod``,
``reviews.prod.svc`` and ``reviews.prod.svc.cluster.local`` as the same Service; anything
else (wildcards, external names) is not a Service of this mesh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.api import mesh_pb2

ServiceKey = tuple[str, str]


@dataclass(frozen=True)
class ServiceIndex:
    """The translated Services (and their selectors) by ``(namespace, name)``."""

    services: Mapping[ServiceKey, mesh_pb2.Service]
    cluster_domain: str
    selectors: Mapping[ServiceKey, Mapping[str, str]] = field(default_factory=dict)

    def get(self, namespace: str, name: str) -> mesh_pb2.Service | None:
        return self.services.get((namespace, name))

    def fqdn(self, namespace: str, name: str) -> str:
        return f"{name}.{namespace}.svc.{self.cluster_domain}"

    def key_of(self, host: str, namespace: str) -> ServiceKey | None:
        """The ``(namespace, name)`` ``host`` names, looked at from ``namespace``; None when
        it cannot name a Service (whether or not that Service exists)."""
        parts = host.split(".")
        if "*" in host or not all(parts):
            return None
        if len(parts) == 1:
            return namespace, parts[0]
        if len(parts) == 2 or (len(parts) == 3 and parts[2] == "svc"):
            return parts[1], parts[0]
        if parts[2] == "svc" and ".".join(parts[3:]) == self.cluster_domain:
            return parts[1], parts[0]
        return None

    def by_host(self, host: str, namespace: str) -> mesh_pb2.Service | None:
        key = self.key_of(host, namespace)
        return None if key is None else self.services.get(key)
