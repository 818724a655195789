"""A snapshot's workloads, Services and waypoints, indexed the way every proxy looks them
up (by uid, by address, by VIP, by "<namespace>/<name>")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh.api import mesh_pb2


@dataclass(frozen=True)
class MeshIndex:
    workloads: Mapping[str, mesh_pb2.Workload]
    by_address: Mapping[str, mesh_pb2.Workload]
    services_by_vip: Mapping[str, mesh_pb2.Service]
    # As Service.waypoint and Workload.waypoint name them.
    waypoints: Mapping[str, mesh_pb2.Waypoint]

    @classmethod
    def build(cls, resources: Mapping[str, mesh_pb2.Resource]) -> MeshIndex:
        workloads: dict[str, mesh_pb2.Workload] = {}
        by_address: dict[str, mesh_pb2.Workload] = {}
        by_vip: dict[str, mesh_pb2.Service] = {}
        waypoints: dict[str, mesh_pb2.Waypoint] = {}
        for res in resources.values():
            kind = res.WhichOneof("kind")
            if kind == "workload":
                workloads[res.workload.uid] = res.workload
                for addr in res.workload.addresses:
                    by_address[addr] = res.workload
            elif kind == "service":
                for vip in res.service.addresses:
                    by_vip[vip] = res.service
            elif kind == "waypoint":
                waypoints[f"{res.waypoint.namespace}/{res.waypoint.name}"] = res.waypoint
        return cls(workloads, by_address, by_vip, waypoints)
