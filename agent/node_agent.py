"""Pod enrollment on one node: desired state from the controller, actual state in BPF and
in ztunnel, one reconcile loop between them.

Order matters for safety: a pod is captured only once ztunnel holds listeners in its
netns (so capture never black-holes traffic that would otherwise flow), and its BPF
attachments go before it is released from ztunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.discovery import find_pod
from agent.ztunnel_link import ZtunnelError, ZtunnelLink
from bpf.loader import BpfError, MeshBpf, PodAttachment, ProxyAttachment
from mesh.api import mesh_pb2, node_pb2
from mesh.cgroups import cgroup_of, cgroup_populated
from mesh.netns import Netns
from mesh.nodeproto import message

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


@dataclass
class Enrolled:
    workload: mesh_pb2.Workload
    netns: Netns
    cgroup: str
    attachment: PodAttachment | None = None
    listeners: list[str] = field(default_factory=list)


def node_workloads(
    node: str, resources: Mapping[str, mesh_pb2.Resource]
) -> dict[str, mesh_pb2.Workload]:
    """Workloads scheduled on this node, enrolled or not, by uid."""
    return {
        res.workload.uid: res.workload
        for res in resources.values()
        if res.WhichOneof("kind") == "workload" and res.workload.node == node
    }


class NodeAgent:
    def __init__(self, node: str, bpf: MeshBpf, link: ZtunnelLink) -> None:
        self.node = node
        self.bpf = bpf
        self.link = link
        self.local: dict[str, mesh_pb2.Workload] = {}
        self.desired: dict[str, mesh_pb2.Workload] = {}
        self.enrolled: dict[str, Enrolled] = {}
        self.errors = 0
        self.synced = False
        # One per cgroup a live ztunnel runs in: during a handover both generations, which
        # may sit in different cgroups (DaemonSet surge), need their original destinations.
        self._proxies: dict[str, ProxyAttachment] = {}
        self._wake = asyncio.Event()
        self._first_pass = asyncio.Event()

    def set_desired(self, resources: Mapping[str, mesh_pb2.Resource]) -> None:
        self.local = node_workloads(self.node, resources)
        self.desired = {uid: w for uid, w in self.local.items() if w.ambient}
        self.synced = True
        self._wake.set()

    async def run(self) -> None:
        """Reconcile whenever something changes, and every second while pods are pending."""
        while True:
            self._wake.clear()
            pending = await self.reconcile()
            timeout = RETRY_SECONDS if pending else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def reconcile(self) -> bool:
        """One pass; True if some desired pod could not be enrolled yet."""
        if self.synced and not self._first_pass.is_set():
            self._release_stale_pins()
        pending = False
        for uid in [u for u in self.enrolled if u not in self.desired]:
            try:
                await self._release(uid)
            except (BpfError, OSError) as exc:
                pending = True
                self.errors += 1
                log.error("pod %s still captured, release failed (will retry): %s", uid, exc)
        for uid, workload in self.desired.items():
            if uid in self.enrolled and self.enrolled[uid].attachment is not None:
                continue
            try:
                await self._enroll(workload)
            except (ZtunnelError, BpfError, OSError) as exc:
                pending = True
                self.errors += 1
                log.warning(
                    "pod %s/%s not enrolled yet: %s", workload.namespace, workload.name, exc
                )
        if self.synced:
            self._first_pass.set()
        return pending

    def _release_stale_pins(self) -> None:
        """After a restart: stop capturing pods a previous agent pinned that are no longer
        enrolled (those still enrolled are adopted by `_enroll`)."""
        for uid in self.bpf.pinned_pods() - self.desired.keys():
            known = self.local.get(uid)
            sandbox = find_pod(uid)
            self.bpf.unpin_pod(
                uid,
                addresses=list(known.addresses) if known else (),
                cgroup_path=str(sandbox.cgroup_path) if sandbox else None,
            )
            log.info("released pod %s pinned by a previous agent", uid)

    async def on_ztunnel_connect(self, pid: int) -> None:
        """A (new) ztunnel: let its cgroup read original destinations, re-send every pod.

        Waits for the first reconcile pass so that a ztunnel that was serving pods while
        this agent restarted is not told to drop them by an empty snapshot.
        """
        await self._first_pass.wait()
        cgroup = str(cgroup_of(pid))
        for path, attachment in list(self._proxies.items()):
            if path != cgroup and not cgroup_populated(path):
                self.bpf.detach_proxy(attachment)
                del self._proxies[path]
        if cgroup not in self._proxies:
            self._proxies[cgroup] = self.bpf.attach_proxy(cgroup)
        log.info("ztunnel cgroup %s may read original destinations", cgroup)
        for uid in list(self.enrolled):
            entry = self.enrolled.get(uid)  # reconcile may release pods while we await
            if entry is not None:
                await self._add_to_ztunnel(entry)
        self._wake.set()

    async def _enroll(self, workload: mesh_pb2.Workload) -> None:
        entry = self.enrolled.get(workload.uid)
        if entry is None:
            sandbox = find_pod(workload.uid)
            if sandbox is None:
                raise ZtunnelError("no running process of the pod found under /proc")
            netns = Netns.open(str(sandbox.netns_path))
            entry = Enrolled(workload, netns, str(sandbox.cgroup_path))
            self.enrolled[workload.uid] = entry
        await self._add_to_ztunnel(entry)
        entry.attachment = self.bpf.attach_pod(
            entry.cgroup, entry.netns.fileno(), list(workload.addresses), pin_key=workload.uid
        )
        log.info(
            "enrolled pod %s/%s (%s)",
            workload.namespace,
            workload.name,
            ", ".join(workload.addresses),
        )

    async def _add_to_ztunnel(self, entry: Enrolled) -> None:
        w = entry.workload
        pod = node_pb2.PodInfo(
            uid=w.uid,
            name=w.name,
            namespace=w.namespace,
            service_account=w.service_account,
            addresses=list(w.addresses),
        )
        fds = await self.link.send(
            message(add_workload=node_pb2.AddWorkload(pod=pod)), (entry.netns.fileno(),)
        )
        try:
            if len(fds) != 1:
                raise ZtunnelError(f"ztunnel sent {len(fds)} listener fds for one pod, expected 1")
            for address in w.addresses:
                self.bpf.set_inbound_listener(address, fds[0])
            entry.listeners = list(w.addresses)
        finally:
            for fd in fds:
                os.close(fd)

    async def _release(self, uid: str) -> None:
        """Capture goes first; a BpfError leaves the pod enrolled for the next pass."""
        entry = self.enrolled[uid]
        w = entry.workload
        if entry.attachment is not None:
            self.bpf.detach_pod(entry.attachment)
        # A pod re-created with the same IP may already own the address's listener entry.
        taken = {a for u, other in self.enrolled.items() if u != uid for a in other.listeners}
        for address in entry.listeners:
            if address not in taken:
                self.bpf.remove_inbound_listener(address)
        del self.enrolled[uid]
        try:
            await self.link.send(message(del_workload=node_pb2.DelWorkload(uid=uid)))
        except ZtunnelError as exc:
            log.warning("ztunnel did not confirm release of %s/%s: %s", w.namespace, w.name, exc)
        entry.netns.close()
        log.info("released pod %s/%s", w.namespace, w.name)

    def close(self) -> None:
        """Let go of the pods' fds but not of their capture: the BPF attachments are pinned
        and stay in force (fail closed) until the next agent adopts them."""
        for entry in self.enrolled.values():
            entry.netns.close()
        self.enrolled.clear()
