"""ztunnel's side of the agent protocol: receive pods (with their netns fds), open
listeners in them, answer with the inbound listener fd for the agent's SOCKMAP.

Listeners outlive the agent connection: if the agent restarts, established connections
keep flowing and the re-sync re-acks the same listeners; `snapshot_done` drops pods the
agent no longer sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from mesh.api import node_pb2
from mesh.nodeproto import SUPERSEDED, Channel, ChannelClosed, ProtocolError, ack, hello

log = logging.getLogger(__name__)

RECONNECT_SECONDS = 0.5
# A newer ztunnel serves the node: ask again now and then, in case it went away.
SUPERSEDED_RETRY_SECONDS = 5.0


class Superseded(ProtocolError):
    """The agent serves a newer ztunnel; this one keeps its listeners until told to drain."""


# add(pod, netns_fd) -> inbound listener fd (borrowed; ztunnel keeps owning it)
AddPod = Callable[[node_pb2.PodInfo, int], Awaitable[int]]
DelPod = Callable[[str], Awaitable[None]]


class InpodClient:
    def __init__(
        self,
        path: Path,
        add: AddPod,
        delete: DelPod,
        known: Callable[[], set[str]],
        owns_listener_fds: bool = False,
    ) -> None:
        """``owns_listener_fds``: ``add`` returns an fd of its own (the supervisor of several
        workers passes one worker's on), closed once the ack carried it."""
        self.path = path
        self._add = add
        self._delete = delete
        self._known = known
        self._owns_listener_fds = owns_listener_fds
        self._channel: Channel | None = None
        self.synced = asyncio.Event()

    def resync(self) -> None:
        """End the session (the agent sees a reconnect and re-sends every pod); for a
        supervisor whose worker died with the listener the agent was given."""
        if self._channel is not None:
            with contextlib.suppress(OSError):
                self._channel.sock.shutdown(socket.SHUT_RDWR)

    async def run(self) -> None:
        """Connect, sync, serve; on any disconnect, reconnect (bounded pace, forever)."""
        while True:
            pause = RECONNECT_SECONDS
            try:
                await self._session()
            except Superseded as exc:
                log.info("agent: %s", exc)
                pause = SUPERSEDED_RETRY_SECONDS
            except (OSError, ChannelClosed, ProtocolError) as exc:
                log.info("agent connection: %s; reconnecting", exc)
            await asyncio.sleep(pause)

    async def _session(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, str(self.path))
        except OSError:
            sock.close()
            raise
        channel = self._channel = Channel(sock)
        try:
            await channel.send(hello())
            log.info("connected to agent at %s", self.path)
            seen: set[str] = set()
            while True:
                msg, fds = await channel.recv()
                await self._dispatch(channel, msg, fds, seen)
        finally:
            self._channel = None
            channel.close()

    async def _dispatch(
        self, channel: Channel, msg: node_pb2.NodeMessage, fds: list[int], seen: set[str]
    ) -> None:
        kind = msg.WhichOneof("payload")
        try:
            if kind == "add_workload":
                if len(fds) != 1:
                    raise ProtocolError(f"add_workload needs one netns fd, got {len(fds)}")
                pod = msg.add_workload.pod
                seen.add(pod.uid)
                try:
                    listener_fd = await self._add(pod, fds[0])
                except Exception as exc:  # answered as a NACK; the agent retries
                    log.warning("cannot serve pod %s/%s: %s", pod.namespace, pod.name, exc)
                    await channel.send(ack(f"ztunnel cannot serve pod: {exc}"))
                    return
                try:
                    await channel.send(ack(), (listener_fd,))
                finally:
                    if self._owns_listener_fds:
                        os.close(listener_fd)
            elif kind == "del_workload":
                await self._delete(msg.del_workload.uid)
                await channel.send(ack())
            elif kind == "ack" and msg.ack.error.startswith(SUPERSEDED):
                raise Superseded(msg.ack.error)
            elif kind == "snapshot_done":
                for uid in self._known() - seen:
                    await self._delete(uid)
                self.synced.set()
                await channel.send(ack())
            else:
                await channel.send(ack(f"unexpected message {kind}"))
        finally:
            for fd in fds:
                os.close(fd)
