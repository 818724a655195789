"""ztunnel.inpod.InpodClient against a real agent-side SOCK_SEQPACKET server run by the
test: hello, add/del/snapshot_done with their acks and fds, reconnects that keep pods,
protocol errors that end a session."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mesh import nodeproto
from mesh.api import node_pb2
from mesh.nodeproto import Channel, ChannelClosed
from tests.unit.fdcheck import fds_open_to
from ztunnel import inpod
from ztunnel.inpod import InpodClient

TIMEOUT = 5.0


def add_msg(uid: str, name: str = "app") -> node_pb2.NodeMessage:
    return nodeproto.message(
        add_workload=node_pb2.AddWorkload(
            pod=node_pb2.PodInfo(
                uid=uid,
                name=name,
                namespace="demo",
                service_account=name,
                addresses=["198.19.1.10"],
            )
        )
    )


def del_msg(uid: str) -> node_pb2.NodeMessage:
    return nodeproto.message(del_workload=node_pb2.DelWorkload(uid=uid))


def snapshot_done() -> node_pb2.NodeMessage:
    return nodeproto.message(snapshot_done=node_pb2.SnapshotDone())


@dataclass
class FakeZtunnel:
    """The ztunnel callbacks: one listener (a pipe read end) per pod, kept for re-adds."""

    netns_file: Path
    pods: dict[str, int] = field(default_factory=dict)
    added: list[tuple[str, int]] = field(default_factory=list)  # (uid, netns inode)
    deleted: list[str] = field(default_factory=list)
    fail: set[str] = field(default_factory=set)
    write_ends: list[int] = field(default_factory=list)
    netns_open_during_add: list[int] = field(default_factory=list)

    async def add(self, pod: node_pb2.PodInfo, netns_fd: int) -> int:
        self.added.append((pod.uid, os.fstat(netns_fd).st_ino))
        self.netns_open_during_add.append(fds_open_to(self.netns_file))
        if pod.uid in self.fail:
            raise RuntimeError(f"netns of {pod.uid} is gone")
        existing = self.pods.get(pod.uid)
        if existing is not None:
            return existing
        r, w = os.pipe()
        self.write_ends.append(w)
        self.pods[pod.uid] = r
        return r

    async def delete(self, uid: str) -> None:
        self.deleted.append(uid)
        fd = self.pods.pop(uid, None)
        if fd is not None:
            os.close(fd)

    def known(self) -> set[str]:
        return set(self.pods)

    def close(self) -> None:
        for fd in [*self.pods.values(), *self.write_ends]:
            os.close(fd)
        self.pods.clear()
        self.write_ends.clear()


class Agent:
    """The agent's end: a listening SOCK_SEQPACKET socket; one Channel per accepted ztunnel."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server.bind(str(path))
        self.server.listen(4)
        self.server.setblocking(False)
        self.channels: list[Channel] = []

    async def accept(self) -> Channel:
        conn, _ = await asyncio.wait_for(
            asyncio.get_running_loop().sock_accept(self.server), TIMEOUT
        )
        channel = Channel(conn)
        self.channels.append(channel)
        return channel

    async def accept_hello(self) -> Channel:
        channel = await self.accept()
        msg, fds = await recv(channel)
        assert msg.WhichOneof("payload") == "hello"
        assert msg.hello.version == nodeproto.PROTOCOL_VERSION
        assert fds == []
        return channel

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        self.server.close()


async def recv(channel: Channel) -> tuple[node_pb2.NodeMessage, list[int]]:
    return await asyncio.wait_for(channel.recv(), TIMEOUT)


async def request(
    channel: Channel, msg: node_pb2.NodeMessage, fds: tuple[int, ...] = ()
) -> tuple[node_pb2.Ack, list[int]]:
    await asyncio.wait_for(channel.send(msg, fds), TIMEOUT)
    reply, reply_fds = await recv(channel)
    assert reply.WhichOneof("payload") == "ack", reply
    return reply.ack, reply_fds


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@dataclass
class Env:
    agent: Agent
    zt: FakeZtunnel
    client: InpodClient
    netns_file: Path
    netns_fd: int  # the "netns" the agent sends

    def netns_inode(self) -> int:
        return os.fstat(self.netns_fd).st_ino


@pytest.fixture
async def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    monkeypatch.setattr(inpod, "RECONNECT_SECONDS", 0.02)
    netns_file = tmp_path / "netns"
    netns_file.write_bytes(b"")
    netns_fd = os.open(netns_file, os.O_RDONLY | os.O_CLOEXEC)
    agent = Agent(tmp_path / "zt.sock")
    zt = FakeZtunnel(netns_file)
    client = InpodClient(agent.path, zt.add, zt.delete, zt.known)
    task = asyncio.create_task(client.run())
    try:
        yield Env(agent, zt, client, netns_file, netns_fd)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)
        agent.close()
        zt.close()
        os.close(netns_fd)


def same_file(fd: int, other: int) -> bool:
    a, b = os.fstat(fd), os.fstat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


async def test_hello_add_del_and_snapshot_done(env: Env) -> None:
    channel = await env.agent.accept_hello()

    ack, fds = await request(channel, add_msg("u1"), (env.netns_fd,))
    assert ack.error == ""
    assert len(fds) == 1
    assert same_file(fds[0], env.zt.pods["u1"])  # ztunnel's listener, passed as SCM_RIGHTS
    os.close(fds[0])
    assert env.zt.added == [("u1", env.netns_inode())]
    assert env.zt.netns_open_during_add == [2]  # ours and the client's copy
    assert fds_open_to(env.netns_file) == 1  # the client closed its copy afterwards

    ack, fds = await request(channel, add_msg("u2"), (env.netns_fd,))
    assert (ack.error, len(fds)) == ("", 1)
    os.close(fds[0])
    assert not env.client.synced.is_set()

    ack, fds = await request(channel, del_msg("u1"))
    assert (ack.error, fds) == ("", [])
    assert env.zt.deleted == ["u1"]

    ack, fds = await request(channel, snapshot_done())
    assert (ack.error, fds) == ("", [])
    assert env.client.synced.is_set()
    assert env.zt.deleted == ["u1"]  # u2 was sent in this session: kept
    assert set(env.zt.pods) == {"u2"}
    assert fds_open_to(env.netns_file) == 1


async def test_failing_add_is_acked_with_the_error_and_no_fd(env: Env) -> None:
    env.zt.fail.add("u1")
    channel = await env.agent.accept_hello()
    ack, fds = await request(channel, add_msg("u1"), (env.netns_fd,))
    assert "netns of u1 is gone" in ack.error
    assert fds == []
    assert fds_open_to(env.netns_file) == 1
    # the session goes on
    env.zt.fail.clear()
    ack, fds = await request(channel, add_msg("u1"), (env.netns_fd,))
    assert (ack.error, len(fds)) == ("", 1)
    os.close(fds[0])


async def test_reconnect_keeps_pods_and_resync_drops_the_rest(env: Env) -> None:
    first = await env.agent.accept_hello()
    for uid in ("u1", "u2", "u3"):
        ack, fds = await request(first, add_msg(uid), (env.netns_fd,))
        assert ack.error == ""
        close_all(fds)
    first.close()  # the agent restarts

    second = await env.agent.accept_hello()
    assert env.zt.deleted == []  # losing the agent drops no pod
    assert set(env.zt.pods) == {"u1", "u2", "u3"}
    assert not env.client.synced.is_set()

    ack, fds = await request(second, add_msg("u2"), (env.netns_fd,))
    assert ack.error == ""
    assert same_file(fds[0], env.zt.pods["u2"])  # same listener back
    os.close(fds[0])
    ack, _ = await request(second, snapshot_done())
    assert ack.error == ""
    assert sorted(env.zt.deleted) == ["u1", "u3"]
    assert set(env.zt.pods) == {"u2"}
    assert env.client.synced.is_set()


async def test_seen_set_is_per_session(env: Env) -> None:
    first = await env.agent.accept_hello()
    ack, fds = await request(first, add_msg("u1"), (env.netns_fd,))
    close_all(fds)
    first.close()

    second = await env.agent.accept_hello()
    ack, _ = await request(second, snapshot_done())
    assert ack.error == ""
    assert env.zt.deleted == ["u1"]  # sent in the previous session only


@pytest.mark.parametrize("nfds", [0, 2])
async def test_add_without_exactly_one_fd_ends_the_session(env: Env, nfds: int) -> None:
    channel = await env.agent.accept_hello()
    fds = tuple(os.dup(env.netns_fd) for _ in range(nfds))
    try:
        await asyncio.wait_for(channel.send(add_msg("u1"), fds), TIMEOUT)
    finally:
        for fd in fds:
            os.close(fd)
    with pytest.raises(ChannelClosed):
        await recv(channel)  # no ack: the client hung up
    await env.agent.accept_hello()  # and came back
    assert env.zt.added == []
    assert fds_open_to(env.netns_file) == 1  # the fds it got were closed


async def test_unexpected_message_is_nacked(env: Env) -> None:
    channel = await env.agent.accept_hello()
    ack, fds = await request(channel, nodeproto.hello())
    assert ack.error == "unexpected message hello"
    assert fds == []
    ack, _ = await request(channel, nodeproto.ack())
    assert ack.error == "unexpected message ack"


async def test_connects_once_the_agent_is_there(tmp_path: Path) -> None:
    """Nothing listening at first: the client keeps trying at its pace."""
    path = tmp_path / "late.sock"
    zt = FakeZtunnel(tmp_path / "netns")
    client = InpodClient(path, zt.add, zt.delete, zt.known)
    task = asyncio.create_task(client.run())
    agent: Agent | None = None
    try:
        await asyncio.sleep(0.1)
        assert not task.done()  # connect failures do not end run()
        agent = Agent(path)
        await asyncio.wait_for(agent.accept_hello(), inpod.RECONNECT_SECONDS + TIMEOUT)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)
        if agent is not None:
            agent.close()
