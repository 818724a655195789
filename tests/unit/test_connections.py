"""ConnectionTable: Istio byte semantics, the live view and the access log, without sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket

import pytest
from prometheus_client import CollectorRegistry

from mesh.hbone.tcp import TcpDuplex
from tests.unit.test_relay import MemoryDuplex
from ztunnel.connections import ConnectionInfo, ConnectionTable
from ztunnel.metrics import ConnectionLabels, TcpMetrics

TIMEOUT = 5
LABELS = ConnectionLabels(
    reporter="source", source_workload="client", destination_workload="server"
)


def sample(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name, {**vars(LABELS)})
    return 0.0 if value is None else value


async def test_request_bytes_are_received_and_response_bytes_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    table = ConnectionTable(TcpMetrics(registry))
    downstream = MemoryDuplex([b"GET / HTTP/1.1\r\n\r\n"])  # 18 request bytes
    upstream = MemoryDuplex([b"HTTP/1.1 200 OK\r\n\r\nhello"], hold_open=True)  # 24 bytes
    info = ConnectionInfo("outbound", "10.0.0.1:4000", "10.0.0.2:80", LABELS, "hbone", "a:1")
    caplog.set_level(logging.INFO, logger="ztunnel.access")

    task = asyncio.create_task(table.relay(info, downstream, upstream))
    await asyncio.sleep(0.01)
    live = table.live()
    assert len(live) == 1 and live[0]["destination"] == "10.0.0.2:80"
    assert sample(registry, "istio_tcp_connections_opened_total") == 1
    upstream.released.set()
    await asyncio.wait_for(task, 5)

    assert len(table) == 0
    assert sample(registry, "istio_tcp_connections_closed_total") == 1
    assert sample(registry, "istio_tcp_received_bytes_total") == 18
    assert sample(registry, "istio_tcp_sent_bytes_total") == 24
    line = caplog.records[-1].getMessage()
    assert line.startswith("outbound complete src.addr=10.0.0.1:4000")
    assert "request_bytes=18 response_bytes=24" in line and "via=hbone hbone=a:1" in line


async def test_open_connections_share_one_labels_instance() -> None:
    table = ConnectionTable(TcpMetrics(CollectorRegistry()))
    copies = [ConnectionLabels(**vars(LABELS)) for _ in range(2)]
    assert copies[0] == copies[1] and copies[0] is not copies[1]
    ups = [MemoryDuplex([], hold_open=True) for _ in copies]
    tasks = [
        asyncio.create_task(
            table.relay(
                ConnectionInfo("outbound", f"10.0.0.1:{4000 + i}", "10.0.0.2:80", labels, "hbone"),
                MemoryDuplex([], hold_open=True),
                up,
            )
        )
        for i, (labels, up) in enumerate(zip(copies, ups, strict=True))
    ]
    await asyncio.sleep(0.01)
    held = [info.labels for info in table._live.values()]
    assert len(held) == 2 and held[0] is held[1] is copies[0]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def tcp_duplex_pair() -> tuple[TcpDuplex, socket.socket]:
    """A `TcpDuplex` (push-capable, as ztunnel's app side) and the raw peer socket."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    _, duplex = await asyncio.get_running_loop().create_connection(TcpDuplex, sock=ours)
    return duplex, theirs


async def test_a_started_connection_keeps_no_task_and_is_accounted_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    table = ConnectionTable(TcpMetrics(registry))
    caplog.set_level(logging.INFO, logger="ztunnel.access")
    loop = asyncio.get_running_loop()
    (down, down_peer), (up, up_peer) = await tcp_duplex_pair(), await tcp_duplex_pair()
    info = ConnectionInfo("outbound", "10.0.0.1:4000", "10.0.0.2:80", LABELS, "hbone", "a:1")
    tasks_before = asyncio.all_tasks()
    relaying = table.start(info, down, up)
    # Both sides push: the relay is a future completed from their callbacks, no task.
    assert not isinstance(relaying, asyncio.Task)
    assert asyncio.all_tasks() == tasks_before
    live = table.live()
    assert live == [
        {
            "id": live[0]["id"],
            "direction": "outbound",
            "source": "10.0.0.1:4000",
            "destination": "10.0.0.2:80",
            "labels": dataclasses.asdict(LABELS),
            "via": "hbone",
            "hbone": "a:1",
            "started": info.started,
        }
    ]
    await loop.sock_sendall(down_peer, b"ping")  # 4 request bytes
    assert await asyncio.wait_for(loop.sock_recv(up_peer, 16), TIMEOUT) == b"ping"
    await loop.sock_sendall(up_peer, b"pong!")  # 5 response bytes
    assert await asyncio.wait_for(loop.sock_recv(down_peer, 16), TIMEOUT) == b"pong!"
    down_peer.shutdown(socket.SHUT_WR)  # half-close: the app still gets its answer
    assert await asyncio.wait_for(loop.sock_recv(up_peer, 16), TIMEOUT) == b""
    await loop.sock_sendall(up_peer, b"bye")
    assert await asyncio.wait_for(loop.sock_recv(down_peer, 16), TIMEOUT) == b"bye"
    up_peer.shutdown(socket.SHUT_WR)
    await asyncio.wait_for(relaying, TIMEOUT)
    await asyncio.sleep(0)  # the accounting callback runs after the relay's own
    assert len(table) == 0
    assert sample(registry, "istio_tcp_received_bytes_total") == 4
    assert sample(registry, "istio_tcp_sent_bytes_total") == 8
    line = caplog.records[-1].getMessage()
    assert line.startswith("outbound complete src.addr=10.0.0.1:4000")
    assert "request_bytes=4 response_bytes=8 duration=" in line
    down_peer.close()
    up_peer.close()


async def test_cancelling_a_started_connection_closes_both_sides_and_accounts_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    table = ConnectionTable(TcpMetrics(registry))
    caplog.set_level(logging.INFO, logger="ztunnel.access")
    loop = asyncio.get_running_loop()
    (down, down_peer), (up, up_peer) = await tcp_duplex_pair(), await tcp_duplex_pair()
    info = ConnectionInfo("inbound", "10.0.0.1:4000", "10.0.0.2:80", LABELS, "hbone")
    relaying = table.start(info, down, up)
    await loop.sock_sendall(down_peer, b"abc")
    assert await asyncio.wait_for(loop.sock_recv(up_peer, 16), TIMEOUT) == b"abc"
    relaying.cancel()  # what a released pod does to its connections
    assert await asyncio.wait_for(loop.sock_recv(down_peer, 16), TIMEOUT) == b""
    assert await asyncio.wait_for(loop.sock_recv(up_peer, 16), TIMEOUT) == b""
    await asyncio.sleep(0)
    assert len(table) == 0
    assert sample(registry, "istio_tcp_connections_closed_total") == 1
    assert sample(registry, "istio_tcp_received_bytes_total") == 3
    assert "inbound complete src.addr=10.0.0.1:4000" in caplog.records[-1].getMessage()
    down_peer.close()
    up_peer.close()
