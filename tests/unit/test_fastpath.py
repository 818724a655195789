"""The same-node fast path without a kernel: which decisions may take it, the map structs
against bpf/maps.py, the destination report and kernel bytes in ConnectionTable, and the
relayed-byte reports that let fastpath.c switch over without reordering."""

from __future__ import annotations

import asyncio
import ctypes
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bpf import maps as bpf_maps
from mesh.api import node_pb2
from mesh.netns import Netns
from mesh.spiffe import SpiffeId
from tests.unit.test_relay import MemoryDuplex
from tests.unit.test_route import waypoint_state
from ztunnel import fastpath, fastpath_maps
from ztunnel.authz import Authorized, Connection, Decision
from ztunnel.connections import Bypass, ConnectionInfo, ConnectionTable
from ztunnel.context import LocalPod, ProxyContext
from ztunnel.fastpath_maps import FastpathKey, SameNodeFastPath
from ztunnel.main import parse_args
from ztunnel.metrics import ConnectionLabels, TcpMetrics
from ztunnel.route import decide_outbound
from ztunnel.state import MeshState

SOURCE = ConnectionLabels(reporter="source", connection_security_policy=fastpath.SAME_NODE)
DESTINATION = ConnectionLabels(
    reporter="destination", connection_security_policy=fastpath.SAME_NODE
)


def layout(cls: Any) -> tuple[int, list[tuple[str, int, int]]]:
    fields = [
        (name, getattr(cls, name).offset, getattr(cls, name).size) for name, *_ in cls._fields_
    ]
    return ctypes.sizeof(cls), fields


@pytest.mark.parametrize(
    ("ours", "agents"),
    [
        (fastpath_maps.FastpathKey, bpf_maps.FastpathKey),
        (fastpath_maps.FastpathBytes, bpf_maps.FastpathBytes),
        (fastpath_maps.FastpathPair, bpf_maps.FastpathPair),
    ],
)
def test_ztunnel_structs_match_the_agents(ours: Any, agents: Any) -> None:
    """bpf/maps.py is compared with the C by a privileged test; ztunnel's copy with it."""
    assert layout(ours) == layout(agents)


def test_reversed_key_is_the_peer_socket() -> None:
    key = FastpathKey(7, 0x0100007F, 0x0600007F, 15001, 40000)
    peer = key.reversed()
    assert (peer.netns_cookie, peer.local_ip4, peer.remote_ip4) == (7, 0x0600007F, 0x0100007F)
    assert (peer.local_port, peer.remote_port) == (40000, 15001)


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A handle for LocalPods that local_target never enters."""
    with Netns.open("/proc/self/ns/net") as handle:
        yield handle


def context(
    state: MeshState, netns: Netns, local: tuple[str, ...], on: bool = True
) -> ProxyContext:
    ctx = ProxyContext(
        certs=None,  # type: ignore[arg-type]
        connections=ConnectionTable(TcpMetrics(CollectorRegistry())),
        state=state,
        fast_path=SameNodeFastPath(Path("/nonexistent")) if on else None,
    )
    identity = SpiffeId("cluster.local", "demo", "x")
    ctx.local_pods.update(
        {uid: LocalPod(node_pb2.PodInfo(uid=uid), netns, identity) for uid in local}
    )
    return ctx


@pytest.mark.parametrize(
    ("dst", "local", "on", "taken"),
    [
        (("10.1.0.10", 8080), ("server-1",), True, True),  # pod IP of a local enrolled pod
        (("10.96.0.10", 80), ("server-1", "server-2"), True, True),  # its Service, no waypoint
        (("10.1.0.10", 8080), ("server-1",), False, False),  # switched off
        (("10.1.0.10", 8080), ("client",), True, False),  # destination on another node
        (("10.2.0.10", 8081), ("plain-1",), True, False),  # not enrolled: plain TCP
        (("10.96.0.70", 80), ("server-1", "wp-pod"), True, False),  # Service with a waypoint
    ],
    ids=["pod", "service", "off", "remote", "not-enrolled", "service-waypoint"],
)
def test_local_target_only_for_direct_hbone_to_a_local_pod(
    netns: Netns, dst: tuple[str, int], local: tuple[str, ...], on: bool, taken: bool
) -> None:
    state = waypoint_state("service")
    ctx = context(state, netns, local, on)
    decision = decide_outbound(state, *dst)
    target = fastpath.local_target(ctx, decision)
    assert (target is not None) is taken
    if target is not None:
        assert decision.destination is not None
        assert target.info.uid == decision.destination.uid


@pytest.mark.parametrize("traffic", ["workload", "all"])
def test_a_pod_behind_a_workload_waypoint_is_never_fast(netns: Netns, traffic: str) -> None:
    state = waypoint_state(traffic)
    ctx = context(state, netns, ("pod-wp", "wp-pod"))
    assert fastpath.local_target(ctx, decide_outbound(state, "10.1.0.95", 8080)) is None


async def test_both_reports_count_relay_and_kernel_bytes(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    table = ConnectionTable(TcpMetrics(registry))
    downstream = MemoryDuplex([b"GET /"])  # 5 bytes relayed in user space
    upstream = MemoryDuplex([b"OK"])  # 2 bytes
    info = ConnectionInfo("outbound", "a:1", "b:2", SOURCE, fastpath.SAME_NODE)
    caplog.set_level(logging.INFO, logger="ztunnel.access")
    await table.relay(info, downstream, upstream, bypass=Bypass(DESTINATION, lambda: (100, 1000)))
    for labels in (SOURCE, DESTINATION):
        values = vars(labels)
        assert registry.get_sample_value("istio_tcp_connections_opened_total", values) == 1
        assert registry.get_sample_value("istio_tcp_connections_closed_total", values) == 1
        assert registry.get_sample_value("istio_tcp_received_bytes_total", values) == 105
        assert registry.get_sample_value("istio_tcp_sent_bytes_total", values) == 1002
    line = caplog.records[-1].getMessage()
    assert "request_bytes=105 response_bytes=1002 kernel_bytes=1100" in line
    assert "via=same_node" in line


class OpenUntilClosed(MemoryDuplex):
    def close(self) -> None:
        super().close()
        self.released.set()


async def test_a_revoked_fast_connection_closes_with_deny_in_both_reports() -> None:
    registry = CollectorRegistry()
    table = ConnectionTable(TcpMetrics(registry))
    downstream = OpenUntilClosed([], hold_open=True)
    upstream = OpenUntilClosed([], hold_open=True)
    info = ConnectionInfo("outbound", "a:1", "b:2", SOURCE, fastpath.SAME_NODE)
    authorized = Authorized("server", Connection("10.1.0.20", None, "10.1.0.10", 8080))
    task = asyncio.create_task(
        table.relay(info, downstream, upstream, authorized, Bypass(DESTINATION, lambda: (0, 0)))
    )
    await asyncio.sleep(0.01)
    assert table.recheck(lambda _: Decision(False, "demo/deny", "denied")) == 1
    await asyncio.wait_for(task, 5)
    for labels in (SOURCE, DESTINATION):
        denied = {**vars(labels), "response_flags": "DENY"}
        assert registry.get_sample_value("istio_tcp_connections_closed_total", denied) == 1


class FakeTcp:
    """What _Relayed uses of a TcpDuplex: writes, a write-blocked flag, unblock callbacks."""

    def __init__(self) -> None:
        self.written = b""
        self.write_blocked = False
        self.closed = False
        self._callbacks: list[Callable[[], None]] = []

    def write(self, data: bytes) -> None:
        self.written += data

    def when_unblocked(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def unblock(self) -> None:
        self.write_blocked = False
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def close(self) -> None:
        self.closed = True


def test_relayed_bytes_are_reported_once_they_left_user_space() -> None:
    inner = FakeTcp()
    reports: list[int] = []
    unpaired: list[bool] = []
    side = fastpath._Relayed(inner, reports.append, lambda: unpaired.append(True))  # type: ignore[arg-type]
    side.write(b"abc")
    assert reports == [3]  # the transport took it all at once
    inner.write_blocked = True  # the next bytes wait in user space
    side.write(b"defg")
    side.write(b"h")
    assert reports == [3], "reported before the bytes reached the kernel"
    inner.unblock()
    assert reports == [3, 8]
    side.close()
    assert unpaired == [True] and inner.closed


def test_the_switch_is_off_by_default_and_off_needs_no_maps(tmp_path: Path) -> None:
    required = ["--agent-socket", "/x", "--node", "n", "--controller", "c:1"]
    args = parse_args([*required, "--root-cert", "/x", "--token-file", "/x"])
    assert args.same_node_fast_path is False
    assert fastpath_maps.from_flags(False, tmp_path / "no-maps") is None
    on = fastpath_maps.from_flags(True, tmp_path / "no-maps")
    assert on is not None and on.maps_dir == tmp_path / "no-maps"


class FailingMaps:
    """Joins and tracks; the second pair() fails (a full map)."""

    def __init__(self) -> None:
        self.pairs: dict[tuple[int, int], int] = {}
        self._keys = iter((FastpathKey(1, 1, 2, 15001, 40000), FastpathKey(2, 7, 3, 50000, 80)))

    def join(self, sock: object) -> FastpathKey:
        return next(self._keys)

    def tracked(self, app: FastpathKey) -> bool:
        return True

    def pair(self, app: FastpathKey, target: FastpathKey, relayed: int) -> None:
        if self.pairs:
            raise OSError(28, "no space")
        self.pairs[(app.netns_cookie, app.local_port)] = relayed

    def unpair(self, app: FastpathKey) -> None:
        self.pairs.pop((app.netns_cookie, app.local_port), None)


class Side:
    def get_extra_info(self, name: str) -> object:
        return object()


def test_a_half_made_pairing_is_undone() -> None:
    maps = FailingMaps()
    assert fastpath._Pairing.start(maps, Side(), Side()) is None  # type: ignore[arg-type]
    assert maps.pairs == {}, "a pair stayed although the connection is relayed in user space"


async def test_no_fast_path_maps_is_said_once_per_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent that left the fast path off (no pinned maps) is not logged every retry."""
    monkeypatch.setattr("ztunnel.fastpath_maps.REOPEN_SECONDS", 0.0)
    caplog.set_level(logging.WARNING, "ztunnel.fastpath_maps")
    fast_path = SameNodeFastPath(tmp_path / "absent")
    assert [fast_path.maps() for _ in range(3)] == [None, None, None]
    warnings = [r for r in caplog.records if "relayed in user space" in r.getMessage()]
    assert len(warnings) == 1
    (tmp_path / "absent").mkdir()  # another cause: a file that is no pinned map
    (tmp_path / "absent" / "fastpath_socks").write_text("")
    assert fast_path.maps() is None
    warnings = [r for r in caplog.records if "relayed in user space" in r.getMessage()]
    assert len(warnings) == 2
