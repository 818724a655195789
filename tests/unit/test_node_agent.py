"""agent.node_agent.NodeAgent against a fake MeshBpf and a fake ZtunnelLink: enrollment
order (ztunnel listens before capture starts), which pods are enrolled, release, retries
while ztunnel is away, stale pins of a previous agent, ztunnel re-sync, close()."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import node_agent
from agent.discovery import PodSandbox
from agent.node_agent import NodeAgent
from agent.ztunnel_link import ZtunnelError, ZtunnelLink
from bpf.loader import MeshBpf, PodAttachment, ProxyAttachment
from mesh.api import mesh_pb2, node_pb2
from tests.unit.fdcheck import fds_open_to

TIMEOUT = 5.0
NODE = "node-1"


def _uid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


UID_A = _uid(1)
UID_B = _uid(2)
UID_C = _uid(3)
UID_X = _uid(4)
UID_Y = _uid(5)


def workload(
    uid: str, name: str, addresses: Sequence[str], *, ambient: bool = True, node: str = NODE
) -> mesh_pb2.Resource:
    return mesh_pb2.Resource(
        key=f"Workload/demo/{name}",
        workload=mesh_pb2.Workload(
            uid=uid,
            name=name,
            namespace="demo",
            service_account=f"sa-{name}",
            node=node,
            addresses=list(addresses),
            ambient=ambient,
        ),
    )


def resources(*items: mesh_pb2.Resource) -> dict[str, mesh_pb2.Resource]:
    return {item.key: item for item in items}


# -- fakes --------------------------------------------------------------------------------


@dataclass
class Call:
    name: str
    args: tuple[object, ...]


class FakeBpf(MeshBpf):
    """Records every call, in order, into a log shared with the fake link."""

    def __init__(self, log: list[Call]) -> None:  # no super(): nothing is compiled
        self.log = log
        self.pins: set[str] = set()
        self.listener_inodes: list[tuple[str, int]] = []
        self.attach_netns_inodes: list[int] = []

    def calls(self, name: str) -> list[Call]:
        return [call for call in self.log if call.name == name]

    def attach_pod(
        self,
        cgroup_path: str,
        netns_fd: int,
        addresses: Sequence[str],
        pin_key: str | None = None,
    ) -> PodAttachment:
        self.attach_netns_inodes.append(os.fstat(netns_fd).st_ino)
        self.log.append(Call("attach_pod", (cgroup_path, netns_fd, list(addresses), pin_key)))
        return PodAttachment(cgroup_path, tuple(addresses), -1, -1, pin_key=pin_key)

    def detach_pod(self, attachment: PodAttachment) -> None:
        self.log.append(Call("detach_pod", (attachment,)))

    def pinned_pods(self) -> set[str]:
        self.log.append(Call("pinned_pods", ()))
        return set(self.pins)

    def unpin_pod(
        self, pin_key: str, addresses: Sequence[str] = (), cgroup_path: str | None = None
    ) -> None:
        self.log.append(Call("unpin_pod", (pin_key, list(addresses), cgroup_path)))

    def attach_proxy(self, cgroup_path: str) -> ProxyAttachment:
        self.log.append(Call("attach_proxy", (cgroup_path,)))
        return ProxyAttachment(cgroup_path, -1)

    def detach_proxy(self, attachment: ProxyAttachment) -> None:
        self.log.append(Call("detach_proxy", (attachment,)))

    def set_inbound_listener(self, address: str, sock_fd: int) -> None:
        # The fd must still be open while the agent hands it over.
        self.listener_inodes.append((address, os.fstat(sock_fd).st_ino))
        self.log.append(Call("set_inbound_listener", (address, sock_fd)))

    def remove_inbound_listener(self, address: str) -> None:
        self.log.append(Call("remove_inbound_listener", (address,)))

    def counters(self) -> dict[str, int]:
        return {}

    def attached_programs(self) -> int:
        return 0


async def _no_connect(pid: int) -> None:
    return None


@dataclass
class Sent:
    kind: str
    msg: node_pb2.NodeMessage
    fd_inodes: list[int]
    listener: Listener | None = None


@dataclass
class Listener:
    """The read end of a pipe whose only write end went to the agent as a 'listener fd'."""

    read_fd: int
    inode: int

    def closed_by_agent(self) -> bool:
        """EOF on the read end: no write end is open any more."""
        try:
            return os.read(self.read_fd, 1) == b""
        except BlockingIOError:
            return False


class FakeLink(ZtunnelLink):
    """Answers add_workload with one fresh listener fd (a pipe end), or raises ZtunnelError
    while "disconnected". Like the real link, one request at a time (FIFO lock); with
    ``hold`` set, add_workload requests wait for it (ztunnel slow to ack)."""

    def __init__(self, log: list[Call]) -> None:
        super().__init__(Path("/nonexistent/ztunnel.sock"), _no_connect)
        self.log = log
        self.up = True
        self.ack_fds = 1
        self.sent: list[Sent] = []
        self.listeners: list[Listener] = []
        self.serial = asyncio.Lock()
        self.hold: asyncio.Event | None = None
        self.holding = False

    @property
    def connected(self) -> bool:
        return self.up

    async def send(self, msg: node_pb2.NodeMessage, fds: tuple[int, ...] = ()) -> list[int]:
        async with self.serial:
            kind = str(msg.WhichOneof("payload"))
            if self.hold is not None and kind == "add_workload":
                self.holding = True
                await self.hold.wait()
                self.holding = False
            return self._answer(kind, msg, fds)

    def _answer(self, kind: str, msg: node_pb2.NodeMessage, fds: tuple[int, ...]) -> list[int]:
        inodes = [os.fstat(fd).st_ino for fd in fds]  # EBADF, as sendmsg, for a closed fd
        self.log.append(Call(f"send:{kind}", (msg, fds)))
        if not self.up:
            raise ZtunnelError("ztunnel is not connected")
        record = Sent(kind, msg, inodes)
        self.sent.append(record)
        if kind != "add_workload":
            return []
        out: list[int] = []
        for _ in range(self.ack_fds):
            r, w = os.pipe()
            os.set_blocking(r, False)
            listener = Listener(r, os.fstat(w).st_ino)
            self.listeners.append(listener)
            record.listener = listener
            out.append(os.dup(w))
            os.close(w)
        return out

    def adds(self, uid: str | None = None) -> list[Sent]:
        return [
            s
            for s in self.sent
            if s.kind == "add_workload" and (uid is None or s.msg.add_workload.pod.uid == uid)
        ]

    def dels(self) -> list[str]:
        return [s.msg.del_workload.uid for s in self.sent if s.kind == "del_workload"]

    def close_pipes(self) -> None:
        for listener in self.listeners:
            os.close(listener.read_fd)
        self.listeners.clear()


@dataclass
class Env:
    agent: NodeAgent
    bpf: FakeBpf
    link: FakeLink
    log: list[Call]
    netns: dict[str, Path]
    found: list[str]
    missing: set[str]

    def names(self) -> list[str]:
        return [call.name for call in self.log]

    def cgroup(self, uid: str) -> Path:
        return Path(f"/sys/fs/cgroup/kubepods/pod{uid}")

    def netns_inode(self, uid: str) -> int:
        return os.stat(self.netns[uid]).st_ino


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    log: list[Call] = []
    bpf = FakeBpf(log)
    link = FakeLink(log)
    netns: dict[str, Path] = {}
    for uid in (UID_A, UID_B, UID_C, UID_X, UID_Y):
        path = tmp_path / f"netns-{uid}"
        path.write_bytes(b"")
        netns[uid] = path
    found: list[str] = []
    missing: set[str] = set()

    def fake_find_pod(uid: str) -> PodSandbox | None:
        found.append(uid)
        if uid in missing:
            return None
        return PodSandbox(1000, str(netns[uid]), Path(f"/sys/fs/cgroup/kubepods/pod{uid}"))

    def fake_cgroup_of(pid: int | str) -> Path:
        return Path(f"/sys/fs/cgroup/node-1/ztunnel-{pid}")

    monkeypatch.setattr(node_agent, "find_pod", fake_find_pod)
    monkeypatch.setattr(node_agent, "cgroup_of", fake_cgroup_of)
    agent = NodeAgent(NODE, bpf, link)
    yield Env(agent, bpf, link, log, netns, found, missing)
    agent.close()
    link.close_pipes()


async def reconcile(agent: NodeAgent) -> bool:
    return await asyncio.wait_for(agent.reconcile(), TIMEOUT)


async def wait_until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), TIMEOUT)


# -- (a) enrollment order ---------------------------------------------------------------


async def test_enroll_hands_pod_to_ztunnel_then_listener_then_capture(env: Env) -> None:
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10", "198.19.1.11"])))
    assert await reconcile(env.agent) is False

    assert env.names() == [
        "pinned_pods",
        "send:add_workload",
        "set_inbound_listener",
        "set_inbound_listener",
        "attach_pod",
    ]
    # add_workload carries the pod and exactly its netns fd
    (add,) = env.link.adds()
    pod = add.msg.add_workload.pod
    assert (pod.uid, pod.name, pod.namespace, pod.service_account) == (UID_A, "a", "demo", "sa-a")
    assert list(pod.addresses) == ["198.19.1.10", "198.19.1.11"]
    assert add.fd_inodes == [env.netns_inode(UID_A)]
    # the listener ztunnel answered with goes in for every address, then is closed
    assert add.listener is not None
    assert env.bpf.listener_inodes == [
        ("198.19.1.10", add.listener.inode),
        ("198.19.1.11", add.listener.inode),
    ]
    assert add.listener.closed_by_agent()
    # capture: the pod's cgroup and netns, its addresses, pinned under its uid
    (attach,) = env.bpf.calls("attach_pod")
    cgroup, _, addresses, pin_key = attach.args
    assert cgroup == str(env.cgroup(UID_A))
    assert addresses == ["198.19.1.10", "198.19.1.11"]
    assert pin_key == UID_A
    assert env.bpf.attach_netns_inodes == [env.netns_inode(UID_A)]
    assert env.agent.enrolled[UID_A].attachment is not None

    # enrolled: a second pass changes nothing
    assert await reconcile(env.agent) is False
    assert len(env.link.adds()) == 1
    assert len(env.bpf.calls("attach_pod")) == 1


async def test_netns_fd_is_held_once_per_enrolled_pod(env: Env) -> None:
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))
    await reconcile(env.agent)
    await reconcile(env.agent)
    assert fds_open_to(env.netns[UID_A]) == 1


# -- (b) which pods -----------------------------------------------------------------------


async def test_only_ambient_workloads_of_this_node_are_enrolled(env: Env) -> None:
    service = mesh_pb2.Resource(
        key="Service/demo/svc", service=mesh_pb2.Service(name="svc", namespace="demo")
    )
    env.agent.set_desired(
        resources(
            workload(UID_A, "a", ["198.19.1.10"]),
            workload(UID_B, "b", ["198.19.1.11"], ambient=False),
            workload(UID_C, "c", ["198.19.2.10"], node="node-2"),
            service,
        )
    )
    assert await reconcile(env.agent) is False

    assert set(env.agent.local) == {UID_A, UID_B}
    assert set(env.agent.desired) == {UID_A}
    assert set(env.agent.enrolled) == {UID_A}
    assert [s.msg.add_workload.pod.uid for s in env.link.adds()] == [UID_A]
    assert [call.args[3] for call in env.bpf.calls("attach_pod")] == [UID_A]
    assert env.found == [UID_A]


# -- (c) release ----------------------------------------------------------------------------


async def test_pod_no_longer_desired_is_released_capture_first(env: Env) -> None:
    env.agent.set_desired(
        resources(
            workload(UID_A, "a", ["198.19.1.10", "198.19.1.11"]),
            workload(UID_B, "b", ["198.19.1.20"]),
        )
    )
    await reconcile(env.agent)
    attachment = env.agent.enrolled[UID_A].attachment
    assert attachment is not None
    assert fds_open_to(env.netns[UID_A]) == 1
    env.log.clear()

    # relabelled: still on the node, no longer ambient
    env.agent.set_desired(
        resources(
            workload(UID_A, "a", ["198.19.1.10", "198.19.1.11"], ambient=False),
            workload(UID_B, "b", ["198.19.1.20"]),
        )
    )
    assert await reconcile(env.agent) is False

    assert env.names() == [
        "detach_pod",
        "remove_inbound_listener",
        "remove_inbound_listener",
        "send:del_workload",
    ]
    assert env.bpf.calls("detach_pod")[0].args[0] is attachment
    assert [c.args[0] for c in env.bpf.calls("remove_inbound_listener")] == [
        "198.19.1.10",
        "198.19.1.11",
    ]
    assert env.link.dels() == [UID_A]
    assert set(env.agent.enrolled) == {UID_B}
    assert fds_open_to(env.netns[UID_A]) == 0
    assert fds_open_to(env.netns[UID_B]) == 1


async def test_release_completes_when_ztunnel_is_gone(env: Env) -> None:
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))
    await reconcile(env.agent)
    env.link.up = False
    env.log.clear()

    env.agent.set_desired({})
    assert await reconcile(env.agent) is False
    assert env.names() == ["detach_pod", "remove_inbound_listener", "send:del_workload"]
    assert env.agent.enrolled == {}
    assert fds_open_to(env.netns[UID_A]) == 0


# -- (d) ztunnel away: pending, never captured ---------------------------------------------


async def test_pod_stays_pending_while_ztunnel_is_disconnected(env: Env) -> None:
    env.link.up = False
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))

    assert await reconcile(env.agent) is True
    assert env.agent.errors == 1
    assert await reconcile(env.agent) is True
    assert env.agent.errors == 2
    assert env.bpf.calls("attach_pod") == []
    assert env.bpf.calls("set_inbound_listener") == []
    assert fds_open_to(env.netns[UID_A]) == 1  # kept for the retry, not leaked per try

    env.link.up = True
    assert await reconcile(env.agent) is False
    assert len(env.bpf.calls("attach_pod")) == 1
    assert env.agent.errors == 2
    assert fds_open_to(env.netns[UID_A]) == 1


async def test_ack_without_listener_fd_is_not_captured(env: Env) -> None:
    env.link.ack_fds = 0
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))
    assert await reconcile(env.agent) is True
    assert env.agent.errors == 1
    assert env.bpf.calls("attach_pod") == []
    assert env.bpf.calls("set_inbound_listener") == []


async def test_two_listener_fds_are_refused_and_closed(env: Env) -> None:
    env.link.ack_fds = 2
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))
    assert await reconcile(env.agent) is True
    assert env.bpf.calls("attach_pod") == []
    assert env.bpf.calls("set_inbound_listener") == []
    assert len(env.link.listeners) == 2
    assert all(listener.closed_by_agent() for listener in env.link.listeners)


async def test_pod_without_process_is_pending(env: Env) -> None:
    env.missing.add(UID_A)
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))
    assert await reconcile(env.agent) is True
    assert env.link.adds() == []
    assert env.bpf.calls("attach_pod") == []
    env.missing.clear()
    assert await reconcile(env.agent) is False
    assert len(env.bpf.calls("attach_pod")) == 1


async def test_run_retries_pending_pods(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_agent, "RETRY_SECONDS", 0.02)
    env.link.up = False
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))
    task = asyncio.create_task(env.agent.run())
    try:
        await wait_until(lambda: env.agent.errors >= 2)
        assert env.bpf.calls("attach_pod") == []
        env.link.up = True  # no wake-up: the retry timer alone must get there
        await wait_until(lambda: bool(env.bpf.calls("attach_pod")))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)


# -- (e) pins of a previous agent ------------------------------------------------------------


async def test_stale_pins_released_at_first_pass_after_desired(env: Env) -> None:
    env.bpf.pins = {UID_A, UID_X, UID_Y}
    env.missing.add(UID_Y)  # pod gone from /proc too
    # before the first config, nothing is known: nothing may be released
    assert await reconcile(env.agent) is False
    assert env.bpf.calls("unpin_pod") == []
    assert env.bpf.calls("pinned_pods") == []

    env.agent.set_desired(
        resources(
            workload(UID_A, "a", ["198.19.1.10"]),
            workload(UID_X, "x", ["198.19.1.40", "198.19.1.41"], ambient=False),
        )
    )
    assert await reconcile(env.agent) is False
    unpinned = {call.args[0]: call.args[1:] for call in env.bpf.calls("unpin_pod")}
    assert unpinned == {
        UID_X: (["198.19.1.40", "198.19.1.41"], str(env.cgroup(UID_X))),
        UID_Y: ([], None),
    }
    # the desired pod is adopted by enrolling it under the same pin key, not unpinned
    (attach,) = env.bpf.calls("attach_pod")
    assert attach.args[3] == UID_A
    names = env.names()
    assert names.index("unpin_pod") < names.index("attach_pod")

    # only once: later passes leave pins to the release path
    env.bpf.pins.add(UID_C)
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))
    assert await reconcile(env.agent) is False
    assert len(env.bpf.calls("unpin_pod")) == 2
    assert len(env.bpf.calls("pinned_pods")) == 1


# -- (f) ztunnel (re)connects --------------------------------------------------------------


async def test_ztunnel_connect_waits_for_first_pass_then_resyncs(env: Env) -> None:
    connect = asyncio.create_task(env.agent.on_ztunnel_connect(4242))
    try:
        await asyncio.sleep(0.05)
        assert not connect.done()
        # a pass before any config does not count
        await reconcile(env.agent)
        env.agent.set_desired(
            resources(
                workload(UID_A, "a", ["198.19.1.10"]),
                workload(UID_B, "b", ["198.19.1.20"]),
            )
        )
        await asyncio.sleep(0.05)
        assert not connect.done()
        assert env.bpf.calls("attach_proxy") == []

        await reconcile(env.agent)
        await asyncio.wait_for(connect, TIMEOUT)
    finally:
        connect.cancel()

    (proxy,) = env.bpf.calls("attach_proxy")
    assert proxy.args == ("/sys/fs/cgroup/node-1/ztunnel-4242",)
    assert env.bpf.calls("detach_proxy") == []
    # every enrolled pod sent twice: once by the pass, once by the re-sync
    assert len(env.link.adds(UID_A)) == 2
    assert len(env.link.adds(UID_B)) == 2
    resent = env.link.adds(UID_A)[1]
    assert resent.fd_inodes == [env.netns_inode(UID_A)]
    assert resent.listener is not None
    assert ("198.19.1.10", resent.listener.inode) in env.bpf.listener_inodes
    assert resent.listener.closed_by_agent()
    assert len(env.bpf.calls("attach_pod")) == 2  # capture is not redone

    # a newer ztunnel: the older one's attachment goes once its cgroup is empty
    first = env.agent._proxies["/sys/fs/cgroup/node-1/ztunnel-4242"]
    await asyncio.wait_for(env.agent.on_ztunnel_connect(4343), TIMEOUT)
    (detached,) = env.bpf.calls("detach_proxy")
    assert detached.args[0] is first
    assert [c.args[0] for c in env.bpf.calls("attach_proxy")] == [
        "/sys/fs/cgroup/node-1/ztunnel-4242",
        "/sys/fs/cgroup/node-1/ztunnel-4343",
    ]
    assert len(env.link.adds(UID_A)) == 3


async def test_a_draining_ztunnel_keeps_its_original_destinations(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Handover with surge: the old ztunnel (another cgroup, still running) still needs the
    getsockopt program for the connections it accepted; the agent re-attaches nothing."""
    monkeypatch.setattr(node_agent, "cgroup_populated", lambda path: True)
    env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))
    await reconcile(env.agent)
    for pid in (4242, 4343, 4343):
        await asyncio.wait_for(env.agent.on_ztunnel_connect(pid), TIMEOUT)
    assert env.bpf.calls("detach_proxy") == []
    assert [c.args[0] for c in env.bpf.calls("attach_proxy")] == [
        "/sys/fs/cgroup/node-1/ztunnel-4242",
        "/sys/fs/cgroup/node-1/ztunnel-4343",
    ]


# -- (g) close ------------------------------------------------------------------------------


async def test_close_lets_go_of_fds_but_keeps_capture(env: Env) -> None:
    env.agent.set_desired(
        resources(
            workload(UID_A, "a", ["198.19.1.10"]),
            workload(UID_B, "b", ["198.19.1.20"]),
        )
    )
    await reconcile(env.agent)
    await asyncio.wait_for(env.agent.on_ztunnel_connect(4242), TIMEOUT)
    assert fds_open_to(env.netns[UID_A]) == fds_open_to(env.netns[UID_B]) == 1
    env.log.clear()

    env.agent.close()
    assert fds_open_to(env.netns[UID_A]) == fds_open_to(env.netns[UID_B]) == 0
    assert env.log == []  # no detach, no unpin, no del_workload
    assert env.agent.enrolled == {}


async def test_pod_released_during_resync_is_not_re_added(env: Env) -> None:
    env.agent.set_desired(
        resources(
            workload(UID_A, "a", ["198.19.1.10"]),
            workload(UID_B, "b", ["198.19.1.20"]),
        )
    )
    await reconcile(env.agent)
    env.link.hold = asyncio.Event()
    connect = asyncio.create_task(env.agent.on_ztunnel_connect(4242))
    release: asyncio.Task[bool] | None = None
    try:
        await wait_until(lambda: env.link.holding)  # re-sending A, ztunnel slow to ack
        env.agent.set_desired(resources(workload(UID_A, "a", ["198.19.1.10"])))
        release = asyncio.create_task(env.agent.reconcile())
        await wait_until(lambda: bool(env.bpf.calls("detach_pod")))  # B on its way out
        env.link.hold.set()
        await asyncio.wait_for(asyncio.gather(connect, release, return_exceptions=True), TIMEOUT)
    finally:
        connect.cancel()
        if release is not None:
            release.cancel()

    assert release.result() is False
    assert env.link.dels() == [UID_B]
    names = [
        (call.name, call.args[0])
        for call in env.log
        if call.name in ("set_inbound_listener", "remove_inbound_listener")
    ]
    assert names[-1] != ("set_inbound_listener", "198.19.1.20")
    del_at = next(i for i, s in enumerate(env.link.sent) if s.kind == "del_workload")
    assert [
        s
        for s in env.link.sent[del_at:]
        if s.kind == "add_workload" and s.msg.add_workload.pod.uid == UID_B
    ] == []
    assert connect.exception() is None
