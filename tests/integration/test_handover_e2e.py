"""ztunnel restarts with zero resets: 100 long-lived connections streaming both ways plus
a steady stream of new connections, across two rolling restarts of each node's ztunnel.

Real lab (netns, eBPF, mTLS, processes); the traffic is a small asyncio program run as a
process of the client pod against an echo server run as a process of the server pod,
both through the mesh (pod IP, so the Service plays no part).
"""

from __future__ import annotations

import json
import select
import subprocess
import time
from collections.abc import Iterator
from functools import partial

import pytest

from ambimesh.lab import cgroups
from ambimesh.lab.demo import istio_metrics
from ambimesh.lab.lab import Lab
from tests.integration.labs import accepts, metric, running_lab, wait_until

pytestmark = pytest.mark.privileged

LAB_NAME = "amhand"
ECHO_PORT = 9000
LONG_LIVED = 100
WAIT_SECONDS = 60.0
OPENED = "istio_tcp_connections_opened_total"

ECHO = """
import asyncio, sys

async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError as exc:
        print("echo: connection error", exc, flush=True)
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(echo, "0.0.0.0", int(sys.argv[1]), backlog=1024)
    await server.serve_forever()

asyncio.run(main())
"""

# Prints "ready" once every long-lived connection echoed once, runs until a line on stdin,
# then half-closes everything, checks every byte came back in order, prints a JSON summary.
DRIVER = """
import asyncio, json, sys

HOST, PORT, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
CHUNK, PERIOD = 512, 0.2
CYCLE = 251

def expected(conn, offset, size):
    base = bytes((conn + i) % CYCLE for i in range(CYCLE)) * (size // CYCLE + 2)
    start = offset % CYCLE
    return base[start:start + size]

async def long_lived(conn, stop, first_echo):
    sent = got = 0
    try:
        reader, writer = await asyncio.open_connection(HOST, PORT)
        async def read_all():
            nonlocal got
            while data := await reader.read(65536):
                if data != expected(conn, got, len(data)):
                    raise AssertionError(f"bytes out of order at offset {got}")
                got += len(data)
                first_echo.set()
        reading = asyncio.create_task(read_all())
        while not stop.is_set():
            writer.write(expected(conn, sent, CHUNK))
            sent += CHUNK
            await writer.drain()
            await asyncio.sleep(PERIOD)
        writer.write_eof()
        await asyncio.wait_for(reading, 60)
        writer.close()
        return {"sent": sent, "got": got, "error": None if got == sent else "bytes lost"}
    except Exception as exc:
        return {"sent": sent, "got": got, "error": repr(exc)}

async def new_connections(stop, results):
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, PORT), 10)
            writer.write(b"hello, new connection")
            writer.write_eof()
            data = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            results.append(None if data == b"hello, new connection" else f"echo {data!r}")
        except Exception as exc:
            results.append(repr(exc))
        await asyncio.sleep(0.05)

async def main():
    stop = asyncio.Event()
    echoes = [asyncio.Event() for _ in range(N)]
    longs = [asyncio.create_task(long_lived(i, stop, echoes[i])) for i in range(N)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in echoes)), 60)
    results = []
    news = asyncio.create_task(new_connections(stop, results))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    await news
    done = await asyncio.gather(*longs)
    print(json.dumps({"long": done, "new": results}), flush=True)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LAB_NAME) as built:
        yield built


def readline_within(proc: subprocess.Popen[bytes], seconds: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    if not ready:
        raise AssertionError(f"no output within {seconds}s")
    return proc.stdout.readline()


def ztunnels_on(lab: Lab, node: str, count: int) -> bool:
    return len(cgroups.pids(cgroups.component_cgroup(lab.name, node, "ztunnel"))) == count


def test_two_rolling_restarts_of_each_ztunnel_reset_nothing(lab: Lab) -> None:
    plan = lab.load_plan()
    server = plan.pod("demo/server")
    echo = lab.spawn_in_pod("demo/server", ["python", "-c", ECHO, str(ECHO_PORT)], capture=True)
    driver = None
    try:
        wait_until(partial(accepts, server.netns, ECHO_PORT), "the echo server", WAIT_SECONDS)
        driver = lab.spawn_in_pod(
            "demo/client",
            ["python", "-c", DRIVER, server.address, str(ECHO_PORT), str(LONG_LIVED)],
            capture=True,
            stdin=subprocess.PIPE,
        )
        assert readline_within(driver, WAIT_SECONDS).strip() == b"ready"
        generations = {"node-1": 1, "node-2": 1}
        for _ in range(2):
            for node in ("node-1", "node-2"):
                lab.restart_component(node, "ztunnel")
                generations[node] += 1
                time.sleep(1.0)  # traffic keeps flowing through old and new
        time.sleep(2.0)
        assert driver.stdin is not None
        driver.stdin.write(b"stop\n")
        driver.stdin.flush()
        out, err = driver.communicate(timeout=120)
        assert driver.returncode == 0, err.decode()
        summary = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        for proc in (driver, echo):
            if proc is not None:
                proc.kill()
                proc.wait()

    broken = [c for c in summary["long"] if c["error"] is not None]
    assert broken == [], f"{len(broken)} long-lived connections broke, e.g. {broken[:3]}"
    assert all(c["sent"] > 0 and c["got"] == c["sent"] for c in summary["long"])
    failed = [r for r in summary["new"] if r is not None]
    assert failed == [], (
        f"{len(failed)} of {len(summary['new'])} new connections failed: {failed[:5]}"
    )
    assert len(summary["new"]) >= 20, "too few new connections to mean anything"
    # The metrics go on: the newest generations serve the port and count new connections.
    assert metric(istio_metrics(lab, "node-1"), OPENED, reporter="source") > 0
    assert metric(istio_metrics(lab, "node-2"), OPENED, reporter="destination") > 0
    # Drained generations leave by themselves once their connections ended.
    for node in ("node-1", "node-2"):
        wait_until(
            partial(ztunnels_on, lab, node, 1), f"{node}'s old ztunnels to exit", WAIT_SECONDS
        )
