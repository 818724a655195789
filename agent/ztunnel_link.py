"""The agent's side of the agent <-> ztunnel protocol: a SOCK_SEQPACKET server.

One ztunnel at a time, the newest process: a newer one replaces the one connected (a
restart or a handover), an older one is told it was superseded (during a handover the
draining ztunnel must not take the pods back). Every request waits for its Ack, so the
agent knows which pods have listeners.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from mesh.api import node_pb2
from mesh.nodeproto import SUPERSEDED, Channel, ChannelClosed, ProtocolError, ack, message

log = logging.getLogger(__name__)

ACK_TIMEOUT = 10.0


class ZtunnelError(RuntimeError):
    """ztunnel refused a request or is not connected."""


def peer_pid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _, _ = struct.unpack("3i", creds)
    return int(pid)


def process_start(pid: int) -> int | None:
    """When the process started (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2, in parentheses) may itself hold spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass(frozen=True)
class _Peer:
    channel: Channel
    pid: int
    started: int

    def newer_than(self, other: _Peer) -> bool:
        return (self.started, self.pid) > (other.started, other.pid)


class ZtunnelLink:
    """Serves ztunnel connections; `on_connect(pid)` runs the re-sync of a new ztunnel."""

    def __init__(self, path: Path, on_connect: Callable[[int], Awaitable[None]]) -> None:
        self.path = path
        self._on_connect = on_connect
        self._peer: _Peer | None = None
        self._lock = asyncio.Lock()
        self._server: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self._peer is not None

    @property
    def pid(self) -> int | None:
        """The connected ztunnel's process id."""
        return self._peer.pid if self._peer is not None else None

    def bind(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        server.listen(4)
        server.setblocking(False)
        self._server = server

    async def serve(self) -> None:
        assert self._server is not None, "bind() first"
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._server)
            task = asyncio.create_task(self._handle(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, conn: socket.socket) -> None:
        pid = peer_pid(conn)
        channel = Channel(conn)
        try:
            hello, fds = await asyncio.wait_for(channel.recv(), ACK_TIMEOUT)
            _close_all(fds)
            if hello.WhichOneof("payload") != "hello":
                raise ProtocolError("ztunnel must start with hello")
            log.info("ztunnel (pid %d, protocol %d) connected", pid, hello.hello.version)
            started = process_start(pid)
            if started is None:
                raise ProtocolError(f"ztunnel pid {pid} is gone")
            peer = _Peer(channel, pid, started)
            async with self._lock:
                current = self._peer
                alive = current is not None and process_start(current.pid) == current.started
                if current is not None and alive and current.newer_than(peer):
                    await channel.send(ack(f"{SUPERSEDED}: ztunnel pid {current.pid}"))
                    log.info("ztunnel pid %d superseded by pid %d", pid, current.pid)
                    channel.close()
                    return
                if current is not None:
                    current.channel.close()
                self._peer = peer
            await self._on_connect(pid)
            await self.send(message(snapshot_done=node_pb2.SnapshotDone()))
        except (ChannelClosed, ProtocolError, ZtunnelError, TimeoutError) as exc:
            log.warning("ztunnel (pid %d) sync failed: %s", pid, exc)
            await self._drop(channel)

    async def _drop(self, channel: Channel) -> None:
        async with self._lock:
            if self._peer is not None and self._peer.channel is channel:
                self._peer = None
        channel.close()

    async def send(self, msg: node_pb2.NodeMessage, fds: tuple[int, ...] = ()) -> list[int]:
        """Send one request, wait for its Ack; returns the fds that came with the Ack."""
        async with self._lock:
            if self._peer is None:
                raise ZtunnelError("ztunnel is not connected")
            channel = self._peer.channel
            try:
                await channel.send(msg, fds)
                reply, reply_fds = await asyncio.wait_for(channel.recv(), ACK_TIMEOUT)
            except (ChannelClosed, ProtocolError, TimeoutError) as exc:
                self._peer = None
                channel.close()
                raise ZtunnelError(f"ztunnel connection lost: {exc}") from exc
        if reply.WhichOneof("payload") != "ack":
            _close_all(reply_fds)
            raise ZtunnelError(f"expected ack, got {reply.WhichOneof('payload')}")
        if reply.ack.error:
            _close_all(reply_fds)
            raise ZtunnelError(reply.ack.error)
        return reply_fds

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._peer is not None:
            self._peer.channel.close()
        if self._server is not None:
            self._server.close()
            self.path.unlink(missing_ok=True)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
