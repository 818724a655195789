"""bench.memory's arithmetic and connection plan, and bench.holder's echo and hold."""

from __future__ import annotations

import asyncio
import socket
import threading
import uuid

import pytest

from ambimesh.lab.lab import LabError, bundled_config_dir
from ambimesh.lab.topology import SCALE_FILE, LabPlan, documents_of, plan, scale_documents
from bench import holder
from bench.memory import Memory, growth, per_connection_kib, plan_connections, table


def scaled_plan(pods: int) -> LabPlan:
    files = sorted(p for p in bundled_config_dir().iterdir() if p.suffix == ".yaml")
    docs = documents_of((p.name, p.read_text()) for p in files)
    docs[SCALE_FILE] = scale_documents(docs, pods)
    return plan("t", docs, lambda: str(uuid.uuid4()))


def test_connections_go_from_node_1_scale_pods_to_node_2_scale_pods() -> None:
    holders = plan_connections(scaled_plan(100), 1003, clients=10, servers=5)
    assert {p.node for p in holders.clients} == {"node-1"}
    assert {p.node for p in holders.servers} == {"node-2"}
    assert {p.namespace for p in (*holders.clients, *holders.servers)} == {"scale"}
    assert holders.per_client == (101, 101, 101, 100, 100, 100, 100, 100, 100, 100)
    assert sum(holders.per_client) == 1003


def test_too_few_scale_pods_is_an_error() -> None:
    with pytest.raises(LabError, match="need 10 client pods"):
        plan_connections(scaled_plan(10), 100, clients=10, servers=5)


def test_memory_per_connection_and_table() -> None:
    one = Memory(1, rss_mib=70.0, pss_mib=60.0, anon_mib=40.0, file_mib=20.0)
    loaded = Memory(1, rss_mib=80.0, pss_mib=70.0, anon_mib=50.0, file_mib=20.0)
    workers = Memory(3, rss_mib=150.0, pss_mib=80.0, anon_mib=60.0, file_mib=20.0)
    assert one.mib == 70.0 and workers.mib == 80.0  # RSS alone, PSS summed for several
    assert per_connection_kib(one, loaded, 1024) == 10.0
    steps = {s: {"node-1": one, "node-2": loaded} for s in ("default", "pods", "connections")}
    text = table(
        steps, {"node-1": 10.0, "node-2": 9.5}, {"client": 63.7, "server": 64.2}, 100, 1000
    )
    assert "+ 100 enrolled pods, idle" in text and "+ 1000 open connections" in text
    assert text.splitlines()[-2].split()[-2:] == ["10.0", "9.5"]
    assert text.splitlines()[-1].split()[-2:] == ["63.7", "64.2"]


def test_holder_holds_echoed_connections() -> None:
    loop = asyncio.new_event_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    ready, done = threading.Event(), threading.Event()

    async def serve() -> None:
        server = await asyncio.start_server(holder._echo, sock=listener)
        ready.set()
        async with server:
            await asyncio.to_thread(done.wait, 30)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(5)
        conns = holder.hold(5, [("127.0.0.1", port)])
        assert len(conns) == 5
        for sock in conns:
            sock.close()
    finally:
        done.set()
        thread.join()
        loop.close()


def test_growth_between_heap_reports() -> None:
    def report(**kib: float) -> dict[str, object]:
        lines = [{"where": where, "kib": k, "blocks": 1} for where, k in kib.items()]
        return {"tracemalloc": {"traced_kib": 0, "top_lines": lines}}

    before = report(a=10.0, b=5.0)
    after = report(a=12.0, b=505.0, c=100.0)
    assert growth(before, after) == [("b", 500.0), ("c", 100.0), ("a", 2.0)]
    assert growth({"tracemalloc": "off"}, after, limit=1) == [("b", 505.0)]
