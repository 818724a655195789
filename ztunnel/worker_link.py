"""The channel between ztunnel's supervisor and one of its workers: requests either way,
each answered, over one SOCK_SEQPACKET socketpair. Bodies are JSON; file descriptors
(a pod's netns, a listener) travel beside them as SCM_RIGHTS, as in the agent protocol.

A message longer than one packet goes in chunks (an admin dump of many connections can
exceed a unix socket's buffer); a send lock keeps one message's chunks together.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import json
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from mesh.nodeproto import fd_ready, received_fds

CHUNK = 60 * 1024
MORE, LAST = b"+", b"."
MAX_FDS = 4
MAX_MESSAGE = 64 * 1024 * 1024
CALL_TIMEOUT = 10.0

Body = dict[str, Any]
# (request body, fds the link closes once the handler returns) -> (reply body, fds lent)
Handler = Callable[[Body, list[int]], Awaitable[tuple[Body, tuple[int, ...]]]]


class LinkClosed(ConnectionError):
    """The other process went away (or the link was closed)."""


class RemoteError(RuntimeError):
    """The other side's handler failed; the message is its error."""


class WorkerLink:
    def __init__(self, sock: socket.socket, handlers: Mapping[str, Handler]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._handlers = handlers
        self._loop = asyncio.get_running_loop()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[Body, list[int]]]] = {}
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    async def call(
        self,
        kind: str,
        body: Body | None = None,
        fds: tuple[int, ...] = (),
        timeout: float = CALL_TIMEOUT,
    ) -> tuple[Body, list[int]]:
        """Ask the other side; its reply body and the fds it sent (now ours to close)."""
        if self.closed:
            raise LinkClosed("link closed")
        ident = next(self._ids)
        future: asyncio.Future[tuple[Body, list[int]]] = self._loop.create_future()
        self._pending[ident] = future
        try:
            await self._send({"id": ident, "kind": kind, "body": body or {}}, fds)
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        finally:
            self._pending.pop(ident, None)
            future.cancel()  # a late answer finds no waiter and its fds are closed

    async def run(self) -> None:
        """Read and dispatch until the other side hangs up; then fail what is pending."""
        try:
            while True:
                message, fds = await self._recv_message()
                self._dispatch(message, fds)
        except LinkClosed:
            pass
        finally:
            self.close()
            self.sock.close()

    def close(self) -> None:
        """Fail what is pending and hang up; `run` then returns and releases the socket."""
        if self.closed:
            return
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LinkClosed("link closed"))
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _dispatch(self, message: Body, fds: list[int]) -> None:
        ident = message.get("id")
        if "kind" in message:
            task = self._loop.create_task(self._serve(ident, message, fds))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        future = self._pending.get(ident) if isinstance(ident, int) else None
        if future is None or future.done():  # an answer nobody waits for any more
            _close_all(fds)
        elif "error" in message:
            _close_all(fds)
            future.set_exception(RemoteError(str(message["error"])))
        else:
            future.set_result((message.get("ok") or {}, fds))

    async def _serve(self, ident: object, message: Body, fds: list[int]) -> None:
        handler = self._handlers.get(str(message["kind"]))
        try:
            if handler is None:
                raise RemoteError(f"unknown request {message['kind']!r}")
            body, reply_fds = await handler(message.get("body") or {}, fds)
            reply: Body = {"id": ident, "ok": body}
        except Exception as exc:  # answered as an error: the caller decides
            reply, reply_fds = {"id": ident, "error": f"{type(exc).__name__}: {exc}"}, ()
        finally:
            _close_all(fds)
        with contextlib.suppress(LinkClosed):
            await self._send(reply, reply_fds)

    async def _send(self, message: Body, fds: tuple[int, ...]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        async with self._send_lock:
            for n, chunk in enumerate(chunks):
                flag = LAST if n == len(chunks) - 1 else MORE
                ancillary = []
                if fds and n == 0:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                await self._send_packet(flag + chunk, ancillary)

    async def _send_packet(self, packet: bytes, ancillary: list[Any]) -> None:
        while True:
            if self.closed:
                raise LinkClosed("link closed")
            try:
                self.sock.sendmsg([packet], ancillary)
                return
            except BlockingIOError:
                await fd_ready(self._loop, self.sock, writable=True)
            except OSError as exc:
                raise LinkClosed(str(exc)) from exc

    async def _recv_message(self) -> tuple[Body, list[int]]:
        parts: list[bytes] = []
        fds: list[int] = []
        size = 0
        while True:
            packet, packet_fds = await self._recv_packet()
            fds.extend(packet_fds)
            size += len(packet)
            if not packet or packet[:1] not in (MORE, LAST) or size > MAX_MESSAGE:
                _close_all(fds)
                raise LinkClosed("hang-up or malformed packet")
            parts.append(packet[1:])
            if packet[:1] == LAST:
                break
        try:
            message = json.loads(b"".join(parts))
        except ValueError as exc:
            _close_all(fds)
            raise LinkClosed(f"undecodable message: {exc}") from exc
        if not isinstance(message, dict):
            _close_all(fds)
            raise LinkClosed("message is not an object")
        return message, fds

    async def _recv_packet(self) -> tuple[bytes, list[int]]:
        fd_space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        while True:
            if self.closed:
                raise LinkClosed("link closed")
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(CHUNK + 1, fd_space)
                break
            except BlockingIOError:
                await fd_ready(self._loop, self.sock, writable=False)
            except OSError as exc:
                raise LinkClosed(str(exc)) from exc
        fds = received_fds(ancdata)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_all(fds)
            raise LinkClosed("truncated packet")
        return data, fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
