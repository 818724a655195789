"""ztunnel with two workers per node (`--workers 2`): the workers share the load, and the
node survives one of them dying (SIGKILL): connections the other worker carries go on,
new connections keep working, the worker comes back and takes its share again, the
node's counters never go down; a rolling restart hands over between two generations of
workers; a crash of the supervisor ends the whole ztunnel, which then starts again. No
timing assertions.

Real lab (netns, eBPF, mTLS, processes); the traffic is a small asyncio program run as a
process of the client pod against an echo server in the server pod, through the mesh
(pod IP, so the Service and its waypoint play no part).
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from ambimesh.lab import cgroups
from ambimesh.lab.demo import istio_metrics
from ambimesh.lab.lab import Lab
from ambimesh.lab.netclient import http_get
from tests.integration.labs import accepts, metric, running_lab, wait_until
from tests.integration.test_handover_e2e import ECHO

pytestmark = pytest.mark.privileged

LAB_NAME = "amwork"
WORKERS = 2
ECHO_PORT = 9000
LONG_LIVED = 40
NEW = 30
WAIT_SECONDS = 60.0
ADMIN_PORT = 15000
OPENED = "istio_tcp_connections_opened_total"

# Opens N long-lived connections and prints their local ports; then per stdin line:
# "probe" -> for each, whether 16 bytes still echo (JSON list), "new K" -> K new
# connections one after another, the errors (JSON list), anything else -> exit.
DRIVER = """
import asyncio, json, sys

HOST, PORT, N = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def echo_once(reader, writer, payload):
    writer.write(payload)
    await writer.drain()
    got = b""
    while len(got) < len(payload):
        data = await asyncio.wait_for(reader.read(len(payload) - len(got)), 10)
        if not data:
            raise ConnectionError("closed")
        got += data
    if got != payload:
        raise AssertionError(f"echo {got!r}")

async def probe(i, conn):
    try:
        await echo_once(*conn, b"probe %012d" % i)
        return True
    except Exception:
        return False

async def new_connection(i):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, PORT), 10)
        await echo_once(reader, writer, b"new %d" % i)
        writer.close()
        return None
    except Exception as exc:
        return repr(exc)

async def main():
    conns = [await asyncio.open_connection(HOST, PORT) for _ in range(N)]
    assert all(await asyncio.gather(*(probe(i, c) for i, c in enumerate(conns))))
    ports = [w.get_extra_info("sockname")[1] for _, w in conns]
    print(json.dumps({"ports": ports}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] not in ("probe", "new"):
            return
        if line[0] == "probe":
            answer = await asyncio.gather(*(probe(i, c) for i, c in enumerate(conns)))
        else:
            answer = [await new_connection(i) for i in range(int(line[1]))]
        print(json.dumps(answer), flush=True)

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AMBIMESH_LAB_ZTUNNEL_WORKERS", str(WORKERS))
        with running_lab(LAB_NAME) as built:
            assert built.ztunnel_workers == WORKERS
            yield built


class Driver:
    """The client pod's program, one command and its JSON answer at a time."""

    def __init__(self, lab: Lab, host: str) -> None:
        self.proc = lab.spawn_in_pod(
            "demo/client",
            ["python", "-c", DRIVER, host, str(ECHO_PORT), str(LONG_LIVED)],
            capture=True,
            stdin=subprocess.PIPE,
        )
        self.ports: list[int] = self._answer()["ports"]

    def ask(self, command: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._answer()

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT_SECONDS)
        if not ready:
            raise AssertionError(f"the driver said nothing within {WAIT_SECONDS}s")
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"the driver exited: {err.decode()[-2000:]}")
        return json.loads(line)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def driver(lab: Lab) -> Iterator[Driver]:
    server = lab.load_plan().pod("demo/server")
    echo = lab.spawn_in_pod("demo/server", ["python", "-c", ECHO, str(ECHO_PORT)], capture=True)
    started: Driver | None = None
    try:
        wait_until(partial(accepts, server.netns, ECHO_PORT), "the echo server", WAIT_SECONDS)
        started = Driver(lab, server.address)
        yield started
    finally:
        if started is not None:
            started.stop()
        echo.kill()
        echo.wait()


def admin(lab: Lab, node: str, path: str) -> Any:
    """The node's admin view; asked again if a draining generation's closing port reset
    the request (both generations listen on it for a moment)."""
    netns = lab.load_plan().node(node).netns
    for attempt in range(3):
        try:
            status, body = http_get(netns, "127.0.0.1", ADMIN_PORT, path)
            break
        except ConnectionResetError:
            if attempt == 2:
                raise
    assert status == 200, body
    return json.loads(body)


def workers_of(lab: Lab, node: str) -> dict[int, dict[str, Any]]:
    return {w["index"]: w for w in admin(lab, node, "/config_dump")["workers"]}


def all_workers_ready(lab: Lab, node: str) -> bool:
    workers = workers_of(lab, node)
    return len(workers) == WORKERS and all(w["ready"] for w in workers.values())


def outbound_by_worker(lab: Lab, ports: list[int]) -> dict[int, int]:
    """Which node-1 worker carries each of the driver's connections (by client port)."""
    carried = {}
    for conn in admin(lab, "node-1", "/connections"):
        port = int(conn["source"].rsplit(":", 1)[1])
        if conn["direction"] == "outbound" and port in ports:
            carried[port] = conn["worker"]
    return carried


def access_lines_by_worker(lab: Lab, since: int) -> Counter[str]:
    """node-1 outbound connections completed after byte ``since`` of its log, per worker."""
    with (lab.logs / "ztunnel-node-1.log").open("rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    return Counter(
        line.split()[3] for line in text.splitlines() if "ztunnel.access: outbound complete" in line
    )


def opened_at_source(lab: Lab) -> float:
    return metric(istio_metrics(lab, "node-1"), OPENED, reporter="source")


def test_workers_share_the_load(lab: Lab, driver: Driver) -> None:
    carried = outbound_by_worker(lab, driver.ports)
    assert sorted(carried) == sorted(driver.ports), "every connection is in the admin view"
    shares = Counter(carried.values())
    assert set(shares) == set(range(WORKERS)), f"one worker took everything: {shares}"
    # One metrics endpoint for the node: the workers' counts summed.
    assert opened_at_source(lab) >= LONG_LIVED
    pids = cgroups.pids(cgroups.component_cgroup(lab.name, "node-1", "ztunnel"))
    assert len(pids) == WORKERS + 2  # master, supervisor, workers


def test_the_node_survives_a_worker_dying(lab: Lab, driver: Driver) -> None:
    carried = outbound_by_worker(lab, driver.ports)
    before = opened_at_source(lab)  # also what the supervisor keeps of the dying worker
    victim = workers_of(lab, "node-1")[0]["pid"]
    survivors = [i for i, port in enumerate(driver.ports) if carried[port] != 0]
    assert survivors, "worker 1 carries none of the connections"

    cgroups.signal_all([victim], signal.SIGKILL)

    # What the other worker carries goes on; new connections work while worker 0 is away.
    alive = driver.ask("probe")
    assert [i for i in survivors if not alive[i]] == [], "a surviving worker's connection broke"
    assert driver.ask(f"new {NEW}") == [None] * NEW
    # Worker 0 comes back (another process), takes every pod and is ready.
    wait_until(
        lambda: all_workers_ready(lab, "node-1") and workers_of(lab, "node-1")[0]["pid"] != victim,
        "worker 0 to come back",
        WAIT_SECONDS,
    )
    assert victim not in cgroups.pids(cgroups.component_cgroup(lab.name, "node-1", "ztunnel"))
    # ... and takes its share of new connections again.
    since = (lab.logs / "ztunnel-node-1.log").stat().st_size
    assert driver.ask(f"new {NEW}") == [None] * NEW
    wait_until(
        lambda: sum(access_lines_by_worker(lab, since).values()) >= NEW,
        "the access log lines of the new connections",
    )
    assert set(access_lines_by_worker(lab, since)) == {"worker-0", "worker-1"}
    # The node's counters never went down: the dead worker's last counts are kept.
    assert opened_at_source(lab) >= before + 2 * NEW


def test_a_rolling_restart_hands_over_between_generations_of_workers(
    lab: Lab, driver: Driver
) -> None:
    cgroup = cgroups.component_cgroup(lab.name, "node-1", "ztunnel")
    alive_before = driver.ask("probe")
    old = set(cgroups.pids(cgroup))
    new_master = lab.restart_component("node-1", "ztunnel")
    assert new_master not in old
    # The old generation drains: what it carried goes on; new connections reach the new
    # generation, whose workers both serve (the agent took them as one ztunnel).
    assert driver.ask("probe") == alive_before
    wait_until(lambda: all_workers_ready(lab, "node-1"), "the new generation's workers")
    assert not {w["pid"] for w in workers_of(lab, "node-1").values()} & old
    since = (lab.logs / "ztunnel-node-1.log").stat().st_size
    assert driver.ask(f"new {NEW}") == [None] * NEW
    wait_until(
        lambda: sum(access_lines_by_worker(lab, since).values()) >= NEW,
        "the access log lines of the new connections",
    )
    assert outbound_by_worker(lab, driver.ports) == {}, "the new generation took old ones"
    # Once its connections end, the whole old generation exits by itself.
    driver.stop()
    wait_until(
        lambda: not old & set(cgroups.pids(cgroup)), "the old generation to exit", WAIT_SECONDS
    )
    assert len(cgroups.pids(cgroup)) == WORKERS + 2


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_a_supervisor_crash_ends_the_whole_ztunnel_so_it_can_be_restarted(lab: Lab) -> None:
    """Not a drain: the workers would close their listeners and hold the restart off."""
    cgroup = cgroups.component_cgroup(lab.name, "node-1", "ztunnel")
    pids = set(cgroups.pids(cgroup))
    workers = {w["pid"] for w in workers_of(lab, "node-1").values()}
    (master,) = [pid for pid in pids if parent_of(pid) not in pids]
    (supervisor,) = pids - workers - {master}
    cgroups.signal_all([supervisor], signal.SIGKILL)
    wait_until(lambda: not cgroups.pids(cgroup), "node-1's ztunnel to exit", WAIT_SECONDS)
    lab.start_component("node-1", "ztunnel")
    lab.wait_ready(WAIT_SECONDS)
    driver = Driver(lab, lab.load_plan().pod("demo/server").address)
    try:
        assert driver.ask(f"new {NEW}") == [None] * NEW
    finally:
        driver.stop()
