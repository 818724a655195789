"""The ztunnel process's top object: the current mesh state and one PodProxy per pod the
agent handed over (added, re-acked on re-sync, removed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from functools import partial

from mesh.api import mesh_pb2, node_pb2
from ztunnel import authz
from ztunnel.context import LocalPod, ProxyContext
from ztunnel.pod_proxy import PodProxy
from ztunnel.state import MeshState

log = logging.getLogger(__name__)

DRAIN_POLL_SECONDS = 0.5
# How long a pod handed over before the first config waits for it (the agent then retries).
CONFIG_WAIT_SECONDS = 5.0


class ZtunnelNotReady(RuntimeError):
    """The pod cannot be served yet; the agent is answered with an error and retries."""


class Ztunnel:
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.pods: dict[str, PodProxy] = {}
        self.config_synced = asyncio.Event()

    def update_state(self, version: str, resources: Mapping[str, mesh_pb2.Resource]) -> None:
        """Swap in a new view of the mesh; connections in flight keep the one they started
        with, except that those the new authorization policies deny are closed (as Istio)."""
        self.ctx.state = MeshState.build(version, resources)
        self.config_synced.set()
        closed = self.ctx.connections.recheck(partial(authz.recheck, self.ctx.state))
        if closed:
            log.info("closed %d connections the new authorization policies deny", closed)
        log.info(
            "config version %s: %d workloads, %d services",
            version,
            len(self.ctx.state.workloads),
            len(self.ctx.state.services_by_vip),
        )

    async def add_pod(self, info: node_pb2.PodInfo, netns_fd: int) -> int:
        """Serve the pod, once the mesh state is known: with an empty state every
        destination looks like one outside the mesh and would be sent in plaintext."""
        try:
            await asyncio.wait_for(self.config_synced.wait(), CONFIG_WAIT_SECONDS)
        except TimeoutError:
            raise ZtunnelNotReady(
                f"no configuration from the controller after {CONFIG_WAIT_SECONDS:.0f}s; "
                f"pod {info.namespace}/{info.name} is not served yet"
            ) from None
        if self.ctx.fast_path is not None:
            # The agent pinned its maps before handing pods over: switch sockops' tracking
            # on now, before this pod's first connection, which would otherwise miss it.
            self.ctx.fast_path.maps()
        existing = self.pods.get(info.uid)
        if existing is not None:
            if existing.pod.netns.inode == os.fstat(netns_fd).st_ino:
                return existing.inbound_fd
            log.warning("pod %s has a new network namespace: replacing it", existing.pod.ref)
            await self.del_pod(info.uid)
        pod = LocalPod.adopt(info, netns_fd, self.ctx.trust_domain)
        try:
            proxy = PodProxy(self.ctx, pod)
        except OSError:
            pod.netns.close()
            raise
        try:
            await proxy.start()
        except BaseException:
            await proxy.close()
            raise
        self.pods[info.uid] = proxy
        self.ctx.local_pods[info.uid] = pod
        log.info("serving pod %s (%s) as %s", pod.ref, ", ".join(info.addresses), pod.identity)
        return proxy.inbound_fd

    async def del_pod(self, uid: str) -> None:
        proxy = self.pods.pop(uid, None)
        if proxy is None:
            return
        self.ctx.local_pods.pop(uid, None)
        await proxy.close()
        if not any(p.pod.identity == proxy.pod.identity for p in self.pods.values()):
            self.ctx.certs.forget(proxy.pod.identity)
        log.info("stopped serving pod %s", proxy.pod.ref)

    @property
    def ready(self) -> bool:
        """Config received and every pod's HBONE listener serving."""
        return self.config_synced.is_set() and all(p.serving for p in self.pods.values())

    def known_pods(self) -> set[str]:
        return set(self.pods)

    @property
    def live_connections(self) -> int:
        return sum(p.live_connections for p in self.pods.values())

    async def drain(self, deadline_seconds: float, stop_early: asyncio.Event) -> None:
        """Hand over to a newer ztunnel: stop accepting, serve what is established until it
        ends, the deadline passes or ``stop_early`` is set; then close the rest."""
        for proxy in self.pods.values():
            proxy.drain()
        log.info(
            "draining %d connections (deadline %.0fs)", self.live_connections, deadline_seconds
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_seconds
        while self.live_connections and not stop_early.is_set() and loop.time() < deadline:
            for proxy in self.pods.values():
                proxy.close_idle_tunnels()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_early.wait(), DRAIN_POLL_SECONDS)
        if self.live_connections:
            log.warning("drain ended with %d connections open; closing them", self.live_connections)
        await self.close()

    async def close(self) -> None:
        for uid in list(self.pods):
            await self.del_pod(uid)
        self.ctx.certs.close()
        if self.ctx.fast_path is not None:
            self.ctx.fast_path.close()
