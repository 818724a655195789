"""Fuzz target: the agent <-> ztunnel protocol (mesh.nodeproto, ztunnel.inpod, agent.ztunnel_link).

Feeds real SOCK_SEQPACKET sockets with packets of every shape a confused or hostile peer
could send: valid NodeMessages with random fields, undecodable and truncated bytes, empty
packets, packets around and over MAX_PACKET, and 0 to MAX_FDS + 3 fds as SCM_RIGHTS (in
one or two control messages). Properties: each packet is received as exactly what the
oracle below predicts (a message with its fds, or ProtocolError / ChannelClosed, the only
documented errors); no fd is leaked; the channel, ztunnel's reconnecting client and the
agent's server all keep serving a well-behaved peer afterwards.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import gc
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.ztunnel_link import ZtunnelError, ZtunnelLink
from mesh import nodeproto
from mesh.api import node_pb2
from mesh.nodeproto import MAX_FDS, MAX_PACKET, Channel, ChannelClosed, ProtocolError
from mesh.spiffe import SpiffeId
from tests.fuzz.profiles import examples
from ztunnel import inpod
from ztunnel.inpod import InpodClient

TIMEOUT = 5.0

# --- what a peer sends -------------------------------------------------------------------

_texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "default", "demo", "a" * 63, "UPPER", "ns/with/slash"]),
    # Around the packet limit: an error echoing such a field must still fit in an ack.
    st.integers(MAX_PACKET - 64, MAX_PACKET + 64).map(lambda n: "n" * n),
)
_pods = st.builds(
    node_pb2.PodInfo,
    uid=_texts,
    name=_texts,
    namespace=_texts,
    service_account=_texts,
    addresses=st.lists(st.text(max_size=20), max_size=3),
)
_messages = st.one_of(
    st.builds(
        lambda v: nodeproto.message(hello=node_pb2.Hello(version=v)), st.integers(0, 2**32 - 1)
    ),
    st.builds(lambda p: nodeproto.message(add_workload=node_pb2.AddWorkload(pod=p)), _pods),
    st.builds(lambda u: nodeproto.message(del_workload=node_pb2.DelWorkload(uid=u)), _texts),
    st.just(nodeproto.message(snapshot_done=node_pb2.SnapshotDone())),
    st.builds(nodeproto.ack, _texts),
    st.just(node_pb2.NodeMessage()),
)


@st.composite
def _payloads(draw: st.DrawFn) -> bytes:
    encoded: bytes = draw(_messages).SerializeToString()
    shape = draw(st.sampled_from(["whole", "cut", "garbage tail", "raw", "empty"]))
    if shape == "cut":
        encoded = encoded[: draw(st.integers(0, max(0, len(encoded) - 1)))]
    elif shape == "garbage tail":
        encoded += draw(st.binary(min_size=1, max_size=16))
    elif shape == "raw":
        encoded = draw(st.binary(max_size=64))
    elif shape == "empty":
        encoded = b""
    # Longer is no different (the receiver sees MSG_TRUNC) and would not fit the send buffer.
    return encoded[: MAX_PACKET + 64]


@dataclass(frozen=True)
class Packet:
    data: bytes
    fds: int  # how many fds travel beside it
    split: bool  # in two SCM_RIGHTS control messages instead of one

    def __repr__(self) -> str:  # failing examples stay readable
        data = self.data if len(self.data) <= 80 else f"{self.data[:80]!r}…({len(self.data)} bytes)"
        return f"Packet({data!r}, fds={self.fds}, split={self.split})"


_fd_counts = st.integers(0, MAX_FDS + 3)
_packets = st.builds(Packet, _payloads(), _fd_counts, st.booleans())


def _add(pod: node_pb2.PodInfo) -> bytes:
    return nodeproto.message(add_workload=node_pb2.AddWorkload(pod=pod)).SerializeToString()


def expected(packet: Packet) -> node_pb2.NodeMessage | type[Exception]:
    """The oracle: what `Channel.recv` must make of `packet`."""
    if not packet.data:
        return ChannelClosed  # a zero-length packet reads as the peer hanging up
    if len(packet.data) > MAX_PACKET or packet.fds > MAX_FDS:
        return ProtocolError  # MSG_TRUNC / MSG_CTRUNC
    try:
        return nodeproto.decode(packet.data)
    except ProtocolError:
        return ProtocolError


def send_packet(sock: socket.socket, packet: Packet, fd: int) -> None:
    """Send `packet` with `packet.fds` copies of `fd` (the kernel installs one new fd each)."""
    counts = [packet.fds // 2, packet.fds - packet.fds // 2] if packet.split else [packet.fds]
    ancillary = [
        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * n).tobytes())
        for n in counts
        if n
    ]
    sock.sendmsg([packet.data], ancillary)


# --- fd accounting -----------------------------------------------------------------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def no_fd_leak() -> Any:
    """Fails if the block leaves any fd open that was not open before it."""
    before = open_fds()
    yield
    # The young generations only: a full collection costs more than the example.
    gc.collect(1)
    leaked = {fd: _target(fd) for fd in open_fds() - before}
    leaked = {fd: target for fd, target in leaked.items() if target is not None}
    assert not leaked, f"fds leaked: {leaked}"


def _target(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None  # the fd listdir itself used


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def run(make: Callable[[], Awaitable[None]]) -> None:
    """One example on a fresh loop; any exception the loop reports (a task that died
    unseen, a failing callback) fails the example."""
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: reported.append(ctx))
        async with asyncio.timeout(4 * TIMEOUT):
            await make()

    asyncio.run(main())
    gc.collect(1)  # a dropped task with an unretrieved exception reports it now
    assert not reported, f"the loop reported errors: {reported}"


# --- target 1: Channel.recv --------------------------------------------------------------


@settings(max_examples=examples(1.0))
@given(st.lists(_packets, min_size=1, max_size=5))
@example([Packet(b"", 2, False)])  # an empty packet's fds are closed too
@example([Packet(nodeproto.ack().SerializeToString(), MAX_FDS + 1, True)])
@example([Packet(nodeproto.ack("x" * (MAX_PACKET - 3)).SerializeToString(), 1, False)])
def test_channel_receives_exactly_what_was_sent(packets: list[Packet]) -> None:
    async def scenario() -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_PACKET)
        read_end, write_end = os.pipe()
        sender, receiver = Channel(a), Channel(b)
        try:
            for packet in packets:
                send_packet(a, packet, write_end)
            await sender.send(nodeproto.hello())
            for packet in packets:
                want = expected(packet)
                try:
                    got, fds = await asyncio.wait_for(receiver.recv(), TIMEOUT)
                except (ProtocolError, ChannelClosed) as exc:
                    assert want is type(exc), f"{packet}: got {exc!r}, expected {want}"
                    continue
                close_all(fds)
                assert got == want, f"{packet}: got {got}, expected {want}"
                assert len(fds) == packet.fds
            # Whatever came before, the channel delivers the next good packet intact.
            got, fds = await asyncio.wait_for(receiver.recv(), TIMEOUT)
            assert (got, fds) == (nodeproto.hello(), [])
            os.close(write_end)
            write_end = -1
            # Every received copy of the write end was closed: the pipe reads EOF.
            assert os.read(read_end, 1) == b""
        finally:
            sender.close()
            receiver.close()
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)

    with no_fd_leak():
        run(scenario)


# --- target 2: ztunnel's InpodClient against a fuzzing agent -----------------------------


@dataclass
class Ztunnel:
    """ztunnel's pod callbacks, with the real SPIFFE checks `Ztunnel.add_pod` makes first
    (so a rejected pod fails with the real error text); one pipe per pod as its listener."""

    listeners: dict[str, tuple[int, int]] = field(default_factory=dict)

    async def add(self, pod: node_pb2.PodInfo, netns_fd: int) -> int:
        os.fstat(netns_fd)  # borrowed: must be open during the call
        SpiffeId("cluster.local", pod.namespace, pod.service_account or "default")
        if pod.uid not in self.listeners:
            self.listeners[pod.uid] = os.pipe()
        return self.listeners[pod.uid][0]

    async def delete(self, uid: str) -> None:
        close_all(list(self.listeners.pop(uid, ())))

    def known(self) -> set[str]:
        return set(self.listeners)

    def close(self) -> None:
        for uid in list(self.listeners):
            close_all(list(self.listeners.pop(uid)))


def ztunnel_answers(packet: Packet, want: node_pb2.NodeMessage | type[Exception]) -> bool:
    """Whether ztunnel answers `packet` with an ack (else it ends the session)."""
    if not isinstance(want, node_pb2.NodeMessage):
        return False
    return not want.HasField("add_workload") or packet.fds == 1


@contextlib.asynccontextmanager
async def agent_socket() -> AsyncIterator[tuple[socket.socket, Path]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ztunnel.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            server.bind(str(path))
            server.listen(4)
            server.setblocking(False)
            yield server, path
        finally:
            server.close()


async def accept_hello(server: socket.socket) -> Channel:
    conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(server), TIMEOUT)
    channel = Channel(conn)
    msg, fds = await asyncio.wait_for(channel.recv(), TIMEOUT)
    assert msg == nodeproto.hello() and fds == []
    return channel


@settings(max_examples=examples(0.5))
@given(st.lists(_packets, min_size=1, max_size=4))
# A pod ztunnel rejects, named so that the packet fits but the error quoting it would not.
@example([Packet(_add(node_pb2.PodInfo(uid="u", namespace="N" * (MAX_PACKET - 40))), 1, False)])
def test_inpod_client_survives_any_agent(packets: list[Packet]) -> None:
    async def scenario() -> None:
        ztunnel = Ztunnel()
        netns_r, netns_w = os.pipe()  # stands in for a pod's netns fd
        async with agent_socket() as (server, path):
            client = InpodClient(path, ztunnel.add, ztunnel.delete, ztunnel.known)
            task = asyncio.create_task(client.run())
            channel = await accept_hello(server)
            try:
                for packet in packets:
                    send_packet(channel.sock, packet, netns_r)
                    want = expected(packet)
                    if ztunnel_answers(packet, want):
                        reply, fds = await asyncio.wait_for(channel.recv(), TIMEOUT)
                        assert reply.WhichOneof("payload") == "ack", reply
                        # Only a pod that was added comes back with its listener.
                        added = isinstance(want, node_pb2.NodeMessage) and want.HasField(
                            "add_workload"
                        )
                        assert len(fds) == int(added and not reply.ack.error), (reply, fds)
                        close_all(fds)
                    else:  # ztunnel drops the session and dials again
                        try:
                            reply, fds = await asyncio.wait_for(channel.recv(), TIMEOUT)
                            close_all(fds)
                            raise AssertionError(f"{packet}: expected a hang-up, got {reply}")
                        except ChannelClosed:
                            pass
                        channel.close()
                        channel = await accept_hello(server)
                # Still serving: a well-formed pod is added and answered with its listener.
                good = node_pb2.PodInfo(uid="good", name="app", namespace="demo")
                await channel.send(
                    nodeproto.message(add_workload=node_pb2.AddWorkload(pod=good)), (netns_r,)
                )
                reply, fds = await asyncio.wait_for(channel.recv(), TIMEOUT)
                assert reply == nodeproto.ack() and len(fds) == 1
                close_all(fds)
                assert not task.done(), "the reconnect loop ended"
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                channel.close()
                ztunnel.close()
                close_all([netns_r, netns_w])

    with no_fd_leak(), mock.patch.object(inpod, "RECONNECT_SECONDS", 0.001):
        run(scenario)


# --- target 3: the agent's ZtunnelLink against a fuzzing ztunnel -------------------------


@settings(max_examples=examples(0.5))
@given(
    first=st.one_of(
        st.builds(
            Packet, st.just(nodeproto.hello().SerializeToString()), _fd_counts, st.booleans()
        ),
        _packets,
    ),
    replies=st.lists(_packets, min_size=1, max_size=3),
)
def test_ztunnel_link_survives_any_ztunnel(first: Packet, replies: list[Packet]) -> None:
    async def scenario() -> None:
        connected: list[int] = []

        async def on_connect(pid: int) -> None:
            connected.append(pid)

        listener_r, listener_w = os.pipe()  # what a fuzzing ztunnel passes as its listener
        with tempfile.TemporaryDirectory() as tmp:
            link = ZtunnelLink(Path(tmp) / "ztunnel.sock", on_connect)
            link.bind()
            serving = asyncio.create_task(link.serve())
            try:
                await fuzz_link(link, first, replies, listener_r, connected)
                await well_behaved_ztunnel(link)
                assert not serving.done(), "the agent stopped accepting ztunnel connections"
            finally:
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)
                link.close()
                await asyncio.sleep(0)  # let the cancelled connection tasks finish
                close_all([listener_r, listener_w])

    with no_fd_leak():
        run(scenario)


async def fuzz_link(
    link: ZtunnelLink, first: Packet, replies: list[Packet], fd: int, connected: list[int]
) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await asyncio.get_running_loop().sock_connect(sock, str(link.path))
    ztunnel = Channel(sock)
    try:
        send_packet(sock, first, fd)
        want = expected(first)
        if not (isinstance(want, node_pb2.NodeMessage) and want.HasField("hello")):
            with contextlib.suppress(ChannelClosed):  # the agent hangs up
                await asyncio.wait_for(ztunnel.recv(), TIMEOUT)
                raise AssertionError(f"the agent accepted {first} as a hello")
            assert not link.connected and not connected
            return
        # The agent re-syncs (nothing to send here) and ends with snapshot_done.
        msg, fds = await asyncio.wait_for(ztunnel.recv(), TIMEOUT)
        assert msg.HasField("snapshot_done") and fds == []
        await ztunnel.send(nodeproto.ack())
        await wait_until(lambda: link.connected)
        assert len(connected) == 1
        for reply in replies:
            request = asyncio.create_task(
                link.send(nodeproto.message(del_workload=node_pb2.DelWorkload(uid="u")))
            )
            msg, fds = await asyncio.wait_for(ztunnel.recv(), TIMEOUT)
            assert msg.HasField("del_workload") and fds == []
            send_packet(sock, reply, fd)
            want = expected(reply)
            clean_ack = isinstance(want, node_pb2.NodeMessage) and want == nodeproto.ack()
            try:
                got = await asyncio.wait_for(request, TIMEOUT)
            except ZtunnelError:
                assert not clean_ack, reply
                if not isinstance(want, node_pb2.NodeMessage):
                    return  # the link dropped this ztunnel; nothing more to ask
                continue
            assert clean_ack, reply
            assert len(got) == reply.fds
            close_all(got)
    finally:
        ztunnel.close()


async def well_behaved_ztunnel(link: ZtunnelLink) -> None:
    """Connects, syncs, and answers one request: the agent's requests reach it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    await asyncio.get_running_loop().sock_connect(sock, str(link.path))
    ztunnel = Channel(sock)
    try:
        await ztunnel.send(nodeproto.hello())
        msg, _ = await asyncio.wait_for(ztunnel.recv(), TIMEOUT)
        assert msg.HasField("snapshot_done")
        await ztunnel.send(nodeproto.ack())
        request = asyncio.create_task(
            link.send(nodeproto.message(del_workload=node_pb2.DelWorkload(uid="u")))
        )
        msg, _ = await asyncio.wait_for(ztunnel.recv(), TIMEOUT)
        assert msg.HasField("del_workload")
        await ztunnel.send(nodeproto.ack())
        assert await asyncio.wait_for(request, TIMEOUT) == []
    finally:
        ztunnel.close()


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.001)
