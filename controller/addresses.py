"""One owner per IP address.

ztunnel looks Services up by VIP and workloads by pod IP, so a second object claiming an
address in use would silently take the first one's traffic. Who was there first is read
from the configuration in force: the object holding the address there keeps it, and the
newcomer is the error. The caller rejects the whole update (the project's rule for any
error), so the holder keeps working and nothing else half-applies. Host-network pods all
carry their node's IP, which Kubernetes lets them share: they conflict only with others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.api import mesh_pb2


@dataclass(frozen=True)
class Claim:
    """``key`` (a resource key) wants ``address``; ``ref`` and ``source`` name it for people."""

    address: str
    key: str
    ref: str
    source: str
    field: str
    host_network: bool = False


def conflict(claims: Iterable[Claim], in_force: Mapping[str, mesh_pb2.Resource]) -> str | None:
    """The first address claimed twice, as an error naming both claimants; None if none.

    Who holds what in force is looked up only when some address is claimed twice: for
    10,000 claims with none twice, one set of addresses instead of a walk of every
    resource in force."""
    claims = list(claims)
    if len({claim.address for claim in claims}) == len(claims):
        return None
    holders = _holders(in_force)
    first: dict[str, Claim] = {}
    for claim in claims:
        other = first.setdefault(claim.address, claim)
        if other is claim or (other.host_network and claim.host_network):
            continue
        holder, newcomer = (
            (claim, other) if holders.get(claim.address) == claim.key else (other, claim)
        )
        prefix = f"{newcomer.source}: {newcomer.ref}: {newcomer.field}: {claim.address}"
        if holders.get(claim.address) == holder.key:
            return (
                f"{prefix} already belongs to {holder.ref} ({holder.source}) in the configuration "
                f"in force, which keeps it; give {newcomer.ref} an address of its own"
            )
        return (
            f"{prefix} is also claimed by {holder.ref} ({holder.source}); "
            "an address can belong to one Service or pod only"
        )
    return None


def _holders(resources: Mapping[str, mesh_pb2.Resource]) -> dict[str, str]:
    """address -> key of the resource that has it."""
    out: dict[str, str] = {}
    for key, resource in resources.items():
        kind = resource.WhichOneof("kind")
        if kind == "workload":
            out.update((address, key) for address in resource.workload.addresses)
        elif kind == "service":
            out.update((address, key) for address in resource.service.addresses)
    return out
