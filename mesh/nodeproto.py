"""The agent <-> ztunnel channel: one protobuf NodeMessage per SOCK_SEQPACKET packet,
file descriptors beside it as SCM_RIGHTS.

Encoding is pure; `Channel` is the asyncio edge (recvmsg/sendmsg on a non-blocking socket,
driven by the loop's reader/writer callbacks since asyncio has no ancillary-data API).
"""

from __future__ import annotations

import array
import asyncio
import os
import socket

from mesh.api import node_pb2

MAX_PACKET = 64 * 1024
MAX_FDS = 4
# An Ack's error may quote a field the peer sent (up to a packet long): cut, it always fits.
MAX_ERROR = 1024
PROTOCOL_VERSION = 1


class ChannelClosed(ConnectionError):
    """The peer went away; the other side re-syncs when it comes back."""


class ProtocolError(ValueError):
    """A packet that is not a NodeMessage."""


def encode(message: node_pb2.NodeMessage) -> bytes:
    if message.WhichOneof("payload") is None:
        raise ProtocolError("node message carries no payload (it would read as a hang-up)")
    data = message.SerializeToString()
    if len(data) > MAX_PACKET:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_PACKET}")
    return data


def decode(data: bytes) -> node_pb2.NodeMessage:
    message = node_pb2.NodeMessage()
    try:
        message.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, a plain Exception subclass
        raise ProtocolError(f"undecodable node message ({len(data)} bytes): {exc}") from exc
    if message.WhichOneof("payload") is None:
        raise ProtocolError("node message carries no payload")
    return message


class Channel:
    """One connected SOCK_SEQPACKET socket; the caller owns received fds."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def send(self, message: node_pb2.NodeMessage, fds: tuple[int, ...] = ()) -> None:
        data = encode(message)
        ancillary = []
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        while True:
            try:
                self.sock.sendmsg([data], ancillary)
                return
            except BlockingIOError:
                await fd_ready(self._loop, self.sock, writable=True)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosed(str(exc)) from exc

    async def recv(self) -> tuple[node_pb2.NodeMessage, list[int]]:
        fd_space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(MAX_PACKET, fd_space)
                break
            except BlockingIOError:
                await fd_ready(self._loop, self.sock, writable=False)
            except ConnectionResetError as exc:
                raise ChannelClosed(str(exc)) from exc
        fds = received_fds(ancdata)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed("peer closed the channel")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("truncated node message")
        try:
            return decode(data), fds
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise

    def close(self) -> None:
        self.sock.close()


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message carried (a partial trailing int dropped)."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    return fds


async def fd_ready(loop: asyncio.AbstractEventLoop, sock: socket.socket, *, writable: bool) -> None:
    """Until ``sock`` is readable (or writable): SOCK_SEQPACKET with SCM_RIGHTS has no
    stream API in asyncio, so the callers do their own non-blocking sendmsg/recvmsg."""
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    add = loop.add_writer if writable else loop.add_reader
    remove = loop.remove_writer if writable else loop.remove_reader

    def wake() -> None:
        if not future.done():
            future.set_result(None)

    add(fd, wake)
    try:
        await future
    finally:
        remove(fd)


def message(**payload: object) -> node_pb2.NodeMessage:
    """Build a NodeMessage from one keyword, e.g. message(ack=node_pb2.Ack())."""
    return node_pb2.NodeMessage(**payload)  # type: ignore[arg-type]


# The agent's answer to the hello of a ztunnel older than the one it serves (a handover).
SUPERSEDED = "superseded by a newer ztunnel"


def hello() -> node_pb2.NodeMessage:
    return message(hello=node_pb2.Hello(version=PROTOCOL_VERSION))


def ack(error: str = "") -> node_pb2.NodeMessage:
    if len(error) > MAX_ERROR:
        error = f"{error[:MAX_ERROR]}…({len(error)} chars)"
    return message(ack=node_pb2.Ack(error=error))
