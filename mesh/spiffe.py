"""SPIFFE identities as the mesh writes them: spiffe://<trust-domain>/ns/<namespace>/sa/<sa>."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.api import mesh_pb2

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")


class SpiffeError(ValueError):
    """A string that is not a mesh SPIFFE ID."""


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise SpiffeError(f"invalid trust domain {self.trust_domain!r}")
        labels = (("namespace", self.namespace), ("service account", self.service_account))
        for what, value in labels:
            if not _LABEL.fullmatch(value):
                raise SpiffeError(f"invalid {what} {value!r} in SPIFFE ID")

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise SpiffeError(f"{uri!r} is not a SPIFFE ID: it must start with {prefix}")
        trust_domain, _, path = uri[len(prefix) :].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise SpiffeError(f"{uri!r} is not of the form spiffe://<td>/ns/<namespace>/sa/<sa>")
        return cls(trust_domain, parts[1], parts[3])


DEFAULT_TRUST_DOMAIN = "cluster.local"


def identity_of(workload: mesh_pb2.Workload) -> SpiffeId:
    """The identity a pod's certificate carries (its service account; "default" if none)."""
    return SpiffeId(
        workload.trust_domain or DEFAULT_TRUST_DOMAIN,
        workload.namespace,
        workload.service_account or "default",
    )
