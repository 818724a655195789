"""What happens to denied connections in the ConnectionTable: Istio's DENY response flag,
the access-log line naming the policy, and live connections closed when a policy update
denies them. Real TCP sockets (socketpairs) on both sides of the relay."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from prometheus_client import CollectorRegistry

from mesh.hbone.relay import StreamDuplex
from mesh.spiffe import SpiffeId
from ztunnel.authz import Authorized, Connection, Decision
from ztunnel.connections import ConnectionInfo, ConnectionTable
from ztunnel.metrics import ConnectionLabels, TcpMetrics

LABELS = ConnectionLabels(reporter="destination", destination_workload="server")
CONN = Connection("198.19.1.10", SpiffeId("cluster.local", "demo", "client"), "198.19.2.10", 80)
DENIED = Decision(False, "demo/deny-client", "explicitly denied by: demo/deny-client")
TIMEOUT = 5.0


def info() -> ConnectionInfo:
    return ConnectionInfo("inbound", "198.19.1.10:4000", "198.19.2.10:80", LABELS, "hbone", "x")


def count(registry: CollectorRegistry, name: str, flags: str) -> float:
    labels = {**vars(LABELS), "response_flags": flags}
    return registry.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def tcp_pair() -> AsyncIterator[tuple[StreamDuplex, asyncio.StreamReader]]:
    """A duplex for the table's side of a TCP connection, and the peer's reader."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    peer_reader, peer_writer = await asyncio.open_connection(sock=theirs)
    try:
        yield StreamDuplex(reader, writer), peer_reader
    finally:
        writer.close()
        peer_writer.close()


def test_deny_counts_open_and_a_deny_close(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    table = ConnectionTable(TcpMetrics(registry))
    caplog.set_level(logging.INFO, logger="ztunnel.access")
    table.deny(info(), Decision(False, DENIED.policy, DENIED.reason, ("demo/audit",)))
    assert count(registry, "istio_tcp_connections_opened_total", "-") == 1
    assert count(registry, "istio_tcp_connections_closed_total", "DENY") == 1
    assert count(registry, "istio_tcp_connections_closed_total", "-") == 0
    line = caplog.records[-1].getMessage()
    assert line.startswith("inbound denied src.addr=198.19.1.10:4000")
    assert "audit=demo/audit response_flags=DENY policy=demo/deny-client" in line
    assert len(table) == 0


async def test_recheck_closes_only_what_is_now_denied(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    table = ConnectionTable(TcpMetrics(registry))
    caplog.set_level(logging.INFO, logger="ztunnel.access")
    async with tcp_pair() as (down, down_peer), tcp_pair() as (up, up_peer):
        denied = Authorized("u-server", CONN)
        relay = asyncio.create_task(table.relay(info(), down, up, denied))
        await asyncio.sleep(0.05)
        assert table.recheck(lambda a: Decision(True)) == 0
        assert len(table) == 1
        assert table.recheck(lambda a: DENIED if a is denied else Decision(True)) == 1
        await asyncio.wait_for(relay, TIMEOUT)
        # Both ends see the connection end.
        assert await asyncio.wait_for(down_peer.read(), TIMEOUT) == b""
        assert await asyncio.wait_for(up_peer.read(), TIMEOUT) == b""
    assert len(table) == 0
    assert table.recheck(lambda a: DENIED) == 0  # nothing left to re-check
    assert count(registry, "istio_tcp_connections_opened_total", "-") == 1
    assert count(registry, "istio_tcp_connections_closed_total", "DENY") == 1
    line = caplog.records[-1].getMessage()
    assert line.startswith("inbound closed src.addr=") and "policy=demo/deny-client" in line


async def test_connections_without_authorization_are_never_rechecked() -> None:
    table = ConnectionTable(TcpMetrics(CollectorRegistry()))
    async with tcp_pair() as (down, _), tcp_pair() as (up, _):
        relay = asyncio.create_task(table.relay(info(), down, up))  # e.g. outbound
        await asyncio.sleep(0.05)
        assert table.recheck(lambda a: DENIED) == 0
        assert len(table) == 1
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
