"""The pure parts of ztunnel's multi-worker mode: the supervisor <-> worker link (requests
both ways, fds beside them, chunked large messages, hang-ups), the node's certificate cache
(one CA fetch per renewal period for all workers), the summed metrics (counters never
go down when a worker dies) and the supervisor's pod fan-out. The processes themselves:
tests/integration/test_workers_e2e.py."""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from mesh.api import node_pb2
from mesh.log_format import InfoLines
from mesh.spiffe import SpiffeId
from mesh.tls import TlsIdentity
from tests.unit.certs import CertAuthority, make_ca, make_leaf
from ztunnel.main import default_workers, parse_args, quota_cpus
from ztunnel.node_certs import NodeCertificates
from ztunnel.node_metrics import Totals, WorkersCollector, families_of
from ztunnel.worker_link import Body, LinkClosed, RemoteError, WorkerLink
from ztunnel.workers import Supervisor, _label_logs

TIMEOUT = 5.0
SID = SpiffeId("cluster.local", "demo", "client")
OTHER = SpiffeId("cluster.local", "demo", "server")


# -- the link -------------------------------------------------------------------------


LENT: list[int] = []  # fds the echo handler answered with, closed after each test


async def echo(body: Body, fds: list[int]) -> tuple[Body, tuple[int, ...]]:
    """Answers with the body and, for each fd received, a pipe of its own."""
    lent = []
    for fd in fds:
        r, w = os.pipe()
        os.write(w, os.read(fd, 10))
        os.close(w)
        lent.append(r)
    LENT.extend(lent)
    return {"echo": body}, tuple(lent)


async def fail(_body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
    raise ValueError("no such pod")


@pytest.fixture
async def links() -> AsyncIterator[tuple[WorkerLink, WorkerLink]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    left = WorkerLink(a, {"echo": echo})
    right = WorkerLink(b, {"echo": echo, "fail": fail})
    tasks = [asyncio.create_task(left.run()), asyncio.create_task(right.run())]
    yield left, right
    left.close()
    right.close()
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    for fd in LENT:
        os.close(fd)
    LENT.clear()


async def test_requests_go_both_ways_with_fds(links: tuple[WorkerLink, WorkerLink]) -> None:
    left, right = links
    r, w = os.pipe()
    os.write(w, b"netns")
    os.close(w)
    try:
        body, fds = await left.call("echo", {"pod": "a"}, (r,))
    finally:
        os.close(r)
    assert body == {"echo": {"pod": "a"}}
    assert len(fds) == 1
    assert os.read(fds[0], 10) == b"netns"  # a new fd for the answer's object
    os.close(fds[0])
    body, fds = await right.call("echo", {"n": 1})
    assert body == {"echo": {"n": 1}} and fds == []


async def test_concurrent_calls_and_large_messages(links: tuple[WorkerLink, WorkerLink]) -> None:
    left, _ = links
    big = "x" * 500_000  # several chunks, past a unix socket's buffer
    replies = await asyncio.gather(*(left.call("echo", {"i": i, "big": big}) for i in range(5)))
    assert [body["echo"]["i"] for body, _ in replies] == list(range(5))
    assert all(body["echo"]["big"] == big for body, _ in replies)


async def test_handler_errors_and_unknown_requests(links: tuple[WorkerLink, WorkerLink]) -> None:
    left, _ = links
    with pytest.raises(RemoteError, match="no such pod"):
        await left.call("fail")
    with pytest.raises(RemoteError, match="unknown request"):
        await left.call("nothing")
    assert (await left.call("echo", {"still": True}))[0] == {"echo": {"still": True}}


async def test_hang_up_fails_pending_and_later_calls() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    never = asyncio.Event()

    async def stuck(_body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        await never.wait()
        return {}, ()

    left, right = WorkerLink(a, {}), WorkerLink(b, {"stuck": stuck})
    tasks = [asyncio.create_task(left.run()), asyncio.create_task(right.run())]
    pending = asyncio.create_task(left.call("stuck"))
    await asyncio.sleep(0.05)
    right.close()  # the other process dies
    with pytest.raises(LinkClosed):
        await asyncio.wait_for(pending, TIMEOUT)
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)  # both run() return
    with pytest.raises(LinkClosed):
        await left.call("stuck")


async def test_a_late_answer_after_a_timeout_is_dropped_with_its_fds() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    release = asyncio.Event()
    r, w = os.pipe()

    async def slow(_body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        await release.wait()
        return {}, (r,)

    left, right = WorkerLink(a, {}), WorkerLink(b, {"slow": slow})
    tasks = [asyncio.create_task(left.run()), asyncio.create_task(right.run())]
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(TimeoutError):
        await left.call("slow", timeout=0.05)
    release.set()
    await asyncio.sleep(0.1)
    assert len(os.listdir("/proc/self/fd")) == before  # the received copy was closed
    left.close()
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    os.close(r)
    os.close(w)


# -- certificates ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertAuthority:
    return make_ca()


class Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


class CountingFetch:
    """Blocking like the gRPC call; counts requests per identity."""

    def __init__(self, ca: CertAuthority) -> None:
        self.ca = ca
        self.calls: list[SpiffeId] = []
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, sid: SpiffeId) -> TlsIdentity:
        self.gate.wait(TIMEOUT)
        self.calls.append(sid)
        if self.fail:
            raise RuntimeError("CA unreachable")
        return make_leaf(self.ca, sid, lifetime=datetime.timedelta(hours=2))


async def test_one_fetch_for_all_workers_until_the_renewal_point(ca: CertAuthority) -> None:
    fetch, clock = CountingFetch(ca), Clock()
    certs = NodeCertificates(fetch, clock=clock)
    fetch.gate.clear()
    asking = [asyncio.create_task(certs.identity(SID)) for _ in range(4)]  # 4 workers at once
    await asyncio.sleep(0.05)
    fetch.gate.set()
    first = await asyncio.wait_for(asyncio.gather(*asking), TIMEOUT)
    assert fetch.calls == [SID]
    assert all(identity is first[0] for identity in first)
    clock.now += 3000  # a worker started later: still the cached one
    assert await certs.identity(SID) is first[0]
    assert fetch.calls == [SID]
    clock.now += 1200  # past half the validity (~1 h): the next worker's renewal asks the CA
    renewed = await certs.identity(SID)
    assert renewed is not first[0] and fetch.calls == [SID, SID]
    assert await certs.identity(SID) is renewed  # the other workers get the new one
    assert [s.identity for s in certs.status()] == [SID]


async def test_failures_are_counted_raised_and_retried(ca: CertAuthority) -> None:
    fetch = CountingFetch(ca)
    certs = NodeCertificates(fetch)
    fetch.fail = True
    with pytest.raises(RuntimeError, match="CA unreachable"):
        await certs.identity(SID)
    fetch.fail = False
    await certs.identity(SID)
    assert [(s.identity, s.failed_renewals) for s in certs.status()] == [(SID, 1)]


async def test_forget_keeps_only_identities_in_use(ca: CertAuthority) -> None:
    certs = NodeCertificates(CountingFetch(ca))
    await certs.identity(SID)
    await certs.identity(OTHER)
    certs.forget({OTHER})
    assert [s.identity for s in certs.status()] == [OTHER]


# -- metrics --------------------------------------------------------------------------


def worker_registry(opened: dict[str, float]) -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("istio_tcp_connections_opened", "TCP connections opened.", ["reporter"],
                      registry=registry)  # fmt: skip
    for reporter, n in opened.items():
        counter.labels(reporter).inc(n)
    return registry


def exposition(totals: Totals) -> str:
    registry = CollectorRegistry()
    registry.register(WorkersCollector(lambda: totals))
    return generate_latest(registry).decode()


def test_workers_counters_are_summed_and_survive_a_dead_worker() -> None:
    one = families_of(worker_registry({"source": 3, "destination": 1}))
    two = families_of(worker_registry({"source": 4}))
    retired = Totals()
    totals = retired.copy()
    totals.add(one)
    totals.add(two)
    text = exposition(totals)
    assert "# TYPE istio_tcp_connections_opened_total counter" in text
    assert 'istio_tcp_connections_opened_total{reporter="source"} 7.0' in text
    assert 'istio_tcp_connections_opened_total{reporter="destination"} 1.0' in text
    retired.add(one)  # worker one died; its last counts stay
    after = retired.copy()
    after.add(families_of(worker_registry({"source": 5})))  # worker two counted one more
    assert 'istio_tcp_connections_opened_total{reporter="source"} 8.0' in exposition(after)
    assert (
        retired.families["istio_tcp_connections_opened"].samples
        != after.families["istio_tcp_connections_opened"].samples
    )  # copy() did not alias


def test_workers_flag() -> None:
    base = ["--node", "n", "--controller", "c:1", "--root-cert", "r", "--token-file", "t",
            "--agent-socket", "s"]  # fmt: skip
    assert parse_args(base).workers == default_workers() <= len(os.sched_getaffinity(0))
    assert parse_args([*base, "--workers", "3"]).workers == 3
    with pytest.raises(SystemExit):
        parse_args([*base, "--workers", "0"])


def test_cgroup_cpu_limit_caps_the_default() -> None:
    assert quota_cpus(["max 100000"]) is None
    assert quota_cpus(["max 100000", "150000 100000", "400000 100000"]) == 2  # the tightest
    assert quota_cpus(["1000 100000"]) == 1  # a fraction of a CPU still gets one worker
    assert quota_cpus(["garbage", ""]) is None


# -- the supervisor's pod fan-out -----------------------------------------------------


class FakeWorker:
    """A worker's side of the link: serves each pod with a listener (a pipe read end)."""

    def __init__(self) -> None:
        ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pods: dict[str, int] = {}
        self.link = WorkerLink(ours, {"add_pod": self.add_pod, "del_pod": self.del_pod})
        self.task = asyncio.create_task(self.link.run())

    async def add_pod(self, body: Body, fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        assert len(fds) == 1 and os.readlink(f"/proc/self/fd/{fds[0]}").startswith("net:")
        uid = node_pb2.PodInfo.FromString(base64.b64decode(body["pod"])).uid
        if uid not in self.pods:
            self.pods[uid], w = os.pipe()
            os.close(w)
        return {}, (self.pods[uid],)

    async def del_pod(self, body: Body, _fds: list[int]) -> tuple[Body, tuple[int, ...]]:
        os.close(self.pods.pop(body["uid"]))
        return {}, ()

    async def die(self) -> None:
        self.link.close()
        await self.task
        for fd in self.pods.values():
            os.close(fd)


async def test_supervisor_gives_every_worker_every_pod_and_resyncs_when_the_acked_one_dies(
    ca: CertAuthority, tmp_path: Path
) -> None:
    args = argparse.Namespace(workers=2, trust_domain="cluster.local", agent_socket=tmp_path)
    sup = Supervisor(args, NodeCertificates(CountingFetch(ca)))
    resyncs: list[bool] = []
    sup.inpod.resync = lambda: resyncs.append(True)  # type: ignore[method-assign]
    first, second = FakeWorker(), FakeWorker()
    sup.adopt(0, 100, first.theirs)
    sup.adopt(1, 101, second.theirs)
    info = node_pb2.PodInfo(uid="u1", name="client", namespace="demo", service_account="client")
    with open("/proc/self/ns/net") as netns:
        listener = await sup.add_pod(info, netns.fileno())
    try:  # the agent is given the oldest worker's listener (a copy, closed after the ack)
        assert os.fstat(listener).st_ino == os.fstat(first.pods["u1"]).st_ino
    finally:
        os.close(listener)
    assert set(second.pods) == {"u1"}

    await second.die()  # not the one the agent holds: nothing to re-sync
    await asyncio.wait_for(_until(lambda: len(sup.workers) == 1), TIMEOUT)
    assert resyncs == [] and [w.index for w in sup.live()] == [0]
    await first.die()  # the agent's listener went with it
    await asyncio.wait_for(_until(lambda: not sup.workers), TIMEOUT)
    assert resyncs == [True]

    third = FakeWorker()  # re-forked: it is handed every pod by itself
    sup.adopt(0, 102, third.theirs)
    await asyncio.wait_for(_until(lambda: "u1" in third.pods), TIMEOUT)
    await sup.del_pod("u1")
    assert third.pods == {} and sup.known_pods() == set()
    sup.close()
    await third.die()


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.01)


def test_a_worker_s_lines_name_its_role_and_access_lines_skip_the_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    stream = io.StringIO()
    saved = list(root.handlers)
    root.handlers = [logging.StreamHandler(stream)]
    try:
        _label_logs("worker-1")
        logging.getLogger("ztunnel.access").warning("as a record")

        def refuse(*args: object, **kwargs: object) -> logging.LogRecord:
            raise AssertionError("a LogRecord was made")

        monkeypatch.setattr(logging.Logger, "makeRecord", refuse)
        monkeypatch.setattr(root, "level", logging.INFO)
        InfoLines(logging.getLogger("ztunnel.access")).info("outbound complete")
    finally:
        root.handlers = saved
    first, second = stream.getvalue().splitlines()
    assert first.endswith(" WARNING worker-1 ztunnel.access: as a record")
    assert second.endswith(" INFO worker-1 ztunnel.access: outbound complete")
    assert first[:10] == second[:10]  # the same date format
