"""mesh.nodeproto: NodeMessage encoding, and Channel over a SOCK_SEQPACKET socketpair
(with a file descriptor travelling beside a message as SCM_RIGHTS)."""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest

from mesh import nodeproto
from mesh.api import node_pb2
from mesh.nodeproto import Channel, ChannelClosed, ProtocolError, decode, encode

TIMEOUT = 5.0

MESSAGES: dict[str, node_pb2.NodeMessage] = {
    "hello": nodeproto.hello(),
    "ack": nodeproto.ack(),
    "ack with error": nodeproto.ack("netns gone"),
    "add": nodeproto.message(
        add_workload=node_pb2.AddWorkload(
            pod=node_pb2.PodInfo(
                uid="00000000-0000-0000-0000-000000000001",
                name="client",
                namespace="demo",
                service_account="client",
                addresses=["198.19.1.10", "fd00::10"],
            )
        )
    ),
    "del": nodeproto.message(del_workload=node_pb2.DelWorkload(uid="u1")),
    "snapshot done": nodeproto.message(snapshot_done=node_pb2.SnapshotDone()),
}


@pytest.mark.parametrize("msg", list(MESSAGES.values()), ids=list(MESSAGES))
def test_encode_decode_round_trip(msg: node_pb2.NodeMessage) -> None:
    data = encode(msg)
    assert isinstance(data, bytes)
    assert data  # never an empty packet: that would read as the peer closing
    back = decode(data)
    assert back == msg
    assert back.WhichOneof("payload") == msg.WhichOneof("payload")


def test_helpers() -> None:
    assert nodeproto.hello().hello.version == nodeproto.PROTOCOL_VERSION == 1
    assert nodeproto.ack().WhichOneof("payload") == "ack"
    assert nodeproto.ack().ack.error == ""
    assert nodeproto.ack("boom").ack.error == "boom"


@pytest.mark.parametrize(
    "data",
    [
        b"",  # parses to a message with no payload
        b"\xff",
        b"\xff\xff\xff\xff",
        b"\x0a\x05ab",  # field 1, length 5, only 2 bytes follow
        b"\x0a",  # truncated length
        b"\x08\x01",  # field 1 as a varint: wrong wire type for Hello
        b"\x30\x01",  # unknown field 6 only: no payload
        b"\x00\x00",  # field number 0 is invalid
    ],
)
def test_decode_rejects(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(data)


def test_protocol_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no payload"):
        decode(b"")


def test_encode_rejects_oversized_messages() -> None:
    big = nodeproto.message(del_workload=node_pb2.DelWorkload(uid="x" * nodeproto.MAX_PACKET))
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(big)


def test_an_ack_error_always_fits_a_packet() -> None:
    """The error may quote a field the peer sent, itself up to a packet long."""
    error = nodeproto.ack("x" * nodeproto.MAX_PACKET).ack.error
    assert error.startswith("x" * nodeproto.MAX_ERROR) and error.endswith(
        f"({nodeproto.MAX_PACKET} chars)"
    )
    assert len(encode(nodeproto.ack("x" * nodeproto.MAX_PACKET))) < nodeproto.MAX_PACKET


# --- Channel over a socketpair ---------------------------------------------------------


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Channel, Channel]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    left, right = Channel(a), Channel(b)
    try:
        yield left, right
    finally:
        left.close()
        right.close()


async def test_message_round_trip_without_fds(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    for msg in MESSAGES.values():
        await left.send(msg)
    for msg in MESSAGES.values():
        got, fds = await asyncio.wait_for(right.recv(), TIMEOUT)
        assert got == msg
        assert fds == []


async def test_recv_waits_for_a_message(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    pending = asyncio.ensure_future(right.recv())
    await asyncio.sleep(0.01)
    assert not pending.done()
    await left.send(nodeproto.hello())
    got, fds = await asyncio.wait_for(pending, TIMEOUT)
    assert got == nodeproto.hello()
    assert fds == []


async def test_fd_arrives_as_a_working_fd(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    read_end, write_end = os.pipe()
    received: list[int] = []
    try:
        msg = MESSAGES["add"]
        await left.send(msg, (write_end,))
        os.close(write_end)  # the receiver's copy must keep the pipe open
        write_end = -1
        got, received = await asyncio.wait_for(right.recv(), TIMEOUT)
        assert got == msg
        assert len(received) == 1
        (fd,) = received
        os.write(fd, b"through the channel")
        assert os.read(read_end, 100) == b"through the channel"
        os.close(fd)
        received = []
        assert os.read(read_end, 100) == b""  # that was the last write end
    finally:
        for fd in (read_end, write_end, *received):
            if fd >= 0:
                os.close(fd)


async def test_several_fds_arrive_in_order(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    pipes = [os.pipe() for _ in range(3)]
    received: list[int] = []
    try:
        await left.send(nodeproto.ack(), tuple(w for _, w in pipes))
        got, received = await asyncio.wait_for(right.recv(), TIMEOUT)
        assert got == nodeproto.ack()
        assert len(received) == 3
        for i, ((r, _), fd) in enumerate(zip(pipes, received, strict=True)):
            os.write(fd, bytes([i]))
            assert os.read(r, 1) == bytes([i])
    finally:
        for fd in [*received, *(fd for p in pipes for fd in p)]:
            os.close(fd)


async def test_recv_raises_channel_closed_when_the_peer_closes(
    pair: tuple[Channel, Channel],
) -> None:
    left, right = pair
    pending = asyncio.ensure_future(right.recv())
    await asyncio.sleep(0.01)
    left.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pending, TIMEOUT)


async def test_pending_messages_are_read_before_closed(pair: tuple[Channel, Channel]) -> None:
    left, right = pair
    await left.send(nodeproto.hello())
    left.close()
    got, _ = await asyncio.wait_for(right.recv(), TIMEOUT)
    assert got == nodeproto.hello()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(right.recv(), TIMEOUT)


async def test_send_after_peer_closed_raises_channel_closed(
    pair: tuple[Channel, Channel],
) -> None:
    left, right = pair
    right.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(left.send(nodeproto.hello()), TIMEOUT)


async def test_garbage_packet_raises_protocol_error_and_closes_its_fds(
    pair: tuple[Channel, Channel],
) -> None:
    left, right = pair
    read_end, write_end = os.pipe()
    try:
        left.sock.sendmsg(
            [b"\xff\xff"],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [write_end]).tobytes())],
        )
        os.close(write_end)
        write_end = -1
        with pytest.raises(ProtocolError):
            await asyncio.wait_for(right.recv(), TIMEOUT)
        # The received copy of the write end was closed: the pipe reads EOF.
        assert os.read(read_end, 10) == b""
        # The channel stays usable for the next packet.
        await left.send(nodeproto.hello())
        got, fds = await asyncio.wait_for(right.recv(), TIMEOUT)
        assert got == nodeproto.hello() and fds == []
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_encode_refuses_an_empty_message() -> None:
    with pytest.raises(ProtocolError, match="no payload"):
        encode(node_pb2.NodeMessage())
