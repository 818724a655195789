"""The same-node fast path in the lab (ztunnels with --same-node-fast-path): demo/client-2
and demo/server are both enrolled on node-2.

Taken: a call to server's pod IP is delivered from 127.0.0.7 (HBONE deliveries come from
127.0.0.6), counted with both identities and connection_security_policy="same_node", and
the bytes after the first request of a connection went socket to socket in the kernel.
Not taken: when an AuthorizationPolicy denies the pair (refused, and an open connection is
closed when the policy arrives), and when the destination is Service server, which
waypoint demo/waypoint takes (HBONE to the waypoint, as without the fast path).
Real netns, eBPF, processes.
"""

from __future__ import annotations

import json
import re
import select
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from ambimesh.lab.demo import fetch_in_pod, istio_metrics
from ambimesh.lab.lab import Lab
from ambimesh.lab.netclient import http_get
from tests.integration.labs import (
    WAIT_SECONDS,
    log_text,
    metric,
    running_lab,
    wait_until,
    write_config,
)
from tests.integration.privileged import require_privileged

pytestmark = pytest.mark.privileged

LAB_NAME = "amfast"
CLIENT = "demo/client-2"
CLIENT_SA = "spiffe://cluster.local/ns/demo/sa/client"
SERVER_SA = "spiffe://cluster.local/ns/demo/sa/server"
POLICY_FILE = "fastpath-e2e.yaml"
ADMIN_PORT = 15000
SAME_NODE = {
    "reporter": "destination",
    "source_workload": "client-2",
    "source_principal": CLIENT_SA,
    "destination_workload": "server",
    "destination_principal": SERVER_SA,
    "connection_security_policy": "same_node",
}

# Run in the client pod: eight POSTs on one connection, then the answers as JSON.
KEEP_ALIVE = """
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], 8080, timeout=10)
answers = []
for i in range(8):
    conn.request("POST", f"/keep-{i}", body=b"x" * 100000)
    answers.append(json.loads(conn.getresponse().read()))
print(json.dumps(answers))
"""
# Run in the client pod: one connection, a request per line read from stdin, each answer
# printed as a JSON line (with the client's own port), until EOF.
ON_DEMAND = """
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], 8080, timeout=10)
conn.connect()
port = conn.sock.getsockname()[1]
for line in sys.stdin:
    conn.request("POST", "/" + line.strip(), body=b"y" * 50000)
    print(json.dumps({**json.loads(conn.getresponse().read()), "port": port}), flush=True)
"""
# Run in the client pod: a request, then shutdown(SHUT_WR); the answer must still arrive.
HALF_CLOSE = """
import socket, sys
sock = socket.create_connection((sys.argv[1], 8080), timeout=10)
sock.sendall(b"GET /half-close HTTP/1.0\\r\\nHost: server\\r\\n\\r\\n")
sock.shutdown(socket.SHUT_WR)
answer = b""
while chunk := sock.recv(65536):
    answer += chunk
print(answer.decode())
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LAB_NAME, same_node_fast_path=True) as built:
        yield built


@pytest.fixture
def server_ip(lab: Lab) -> str:
    return lab.load_plan().pod("demo/server").address


@pytest.fixture
def policies(lab: Lab, server_ip: str) -> Iterator[Callable[..., None]]:
    path = lab.config_dir / POLICY_FILE

    def write(*docs: dict[str, Any]) -> None:
        write_config(path, yaml.safe_dump_all(docs, sort_keys=False))

    try:
        yield write
    finally:
        path.unlink(missing_ok=True)
        wait_until(lambda: call(lab, f"http://{server_ip}:8080/after") is not None, "calls again")


def call(lab: Lab, url: str) -> dict[str, Any] | None:
    """The demo app's JSON answer to a GET from the client pod, or None if it failed."""
    result = fetch_in_pod(lab, CLIENT, url)
    return json.loads(result.stdout) if result.returncode == 0 else None


def node2(lab: Lab, name: str, **labels: str) -> float:
    return metric(istio_metrics(lab, "node-2"), name, **labels)


def deny_client() -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client", "namespace": "demo"},
        "spec": {
            "selector": {"matchLabels": {"app": "server"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}],
        },
    }


def kernel_bytes(lab: Lab) -> list[int]:
    """kernel_bytes of ztunnel's access-log lines of completed same-node connections."""
    lines = [
        line
        for line in log_text(lab, "ztunnel-node-2").splitlines()
        if "outbound complete" in line and "via=same_node" in line
    ]
    return [int(m.group(1)) for line in lines if (m := re.search(r"kernel_bytes=(\d+)", line))]


def test_a_same_node_call_takes_the_fast_path(lab: Lab, server_ip: str) -> None:
    opened = node2(lab, "istio_tcp_connections_opened_total", **SAME_NODE)
    source_report = {**SAME_NODE, "reporter": "source"}
    tunnels = node2(lab, "istio_tcp_connections_opened_total", **source_report)
    mtls = {"source_workload": "client-2", "connection_security_policy": "mutual_tls"}
    mtls_before = node2(lab, "istio_tcp_connections_opened_total", **mtls)
    answer = call(lab, f"http://{server_ip}:8080/fast")
    assert answer is not None and answer["pod"] == "server"
    assert answer["peer"].startswith("127.0.0.7:"), answer  # HBONE delivers from 127.0.0.6
    wait_until(
        lambda: node2(lab, "istio_tcp_connections_closed_total", **SAME_NODE) > opened,
        "the same-node connection to be counted",
    )
    assert node2(lab, "istio_tcp_connections_opened_total", **SAME_NODE) == opened + 1
    assert node2(lab, "istio_tcp_received_bytes_total", **SAME_NODE) > 0
    assert node2(lab, "istio_tcp_sent_bytes_total", **SAME_NODE) > 0
    # The source report of the same connection, and no HBONE tunnel besides it.
    assert node2(lab, "istio_tcp_connections_opened_total", **source_report) == tunnels + 1
    assert node2(lab, "istio_tcp_connections_opened_total", **mtls) == mtls_before


def test_bytes_after_the_first_request_go_socket_to_socket(lab: Lab, server_ip: str) -> None:
    before = len(kernel_bytes(lab))
    result = lab.run(CLIENT, ["python", "-c", KEEP_ALIVE, server_ip])
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["body_bytes"] for a in answers] == [100000] * 8
    assert len({a["peer"] for a in answers}) == 1  # one connection
    wait_until(lambda: len(kernel_bytes(lab)) > before, "the connection's access line")
    # The first request goes through ztunnel (sent before the pairing); a later one may too
    # (docs/same-node-fast-path.md, "Nothing overtakes..."); of seven, some do not.
    assert kernel_bytes(lab)[-1] >= 100000


def test_half_close_reaches_the_server_and_the_answer_still_comes(lab: Lab, server_ip: str) -> None:
    result = lab.run(CLIENT, ["python", "-c", HALF_CLOSE, server_ip])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 2)[1] == "200", result.stdout
    answer = json.loads(result.stdout.split("\r\n\r\n", 1)[1])
    assert answer["path"] == "/half-close" and answer["peer"].startswith("127.0.0.7:")


def test_a_deny_policy_refuses_the_fast_path_and_closes_open_connections(
    lab: Lab, server_ip: str, policies: Callable[..., None]
) -> None:
    denied = {**SAME_NODE, "response_flags": "DENY"}
    denied_before = node2(lab, "istio_tcp_connections_closed_total", **denied)
    # An open connection: the server holds its answer for 20 s.
    slow = lab.spawn_in_pod(
        CLIENT,
        ["python", "-c", KEEP_ALIVE.replace("/keep-{i}", "/slow?delay=20"), server_ip],
        capture=True,
    )
    try:
        wait_until(lambda: same_node_live(lab) > 0, "the slow call to be open")
        policies(deny_client())
        wait_until(lambda: call(lab, f"http://{server_ip}:8080/denied") is None, "the DENY")
        slow.communicate(timeout=30)
        assert slow.returncode != 0, "the open connection survived the DENY policy"
    finally:
        slow.kill()
        slow.wait()
    assert node2(lab, "istio_tcp_connections_closed_total", **denied) >= denied_before + 2
    log = log_text(lab, "ztunnel-node-2")
    assert "inbound denied" in log and "policy=demo/deny-client" in log
    assert re.search(r"outbound closed .*via=same_node.*policy=demo/deny-client", log)


def same_node_live(lab: Lab) -> int:
    node = lab.load_plan().node("node-2")
    _, body = http_get(node.netns, "127.0.0.1", ADMIN_PORT, "/connections")
    return sum(c["via"] == "same_node" for c in json.loads(body))


def test_service_through_its_waypoint_never_takes_the_fast_path(lab: Lab) -> None:
    fast_before = node2(lab, "istio_tcp_connections_opened_total", **SAME_NODE)
    via_waypoint = {
        "reporter": "source",
        "source_workload": "client-2",
        "destination_workload": "waypoint",
        "connection_security_policy": "mutual_tls",
    }
    tunnels_before = node2(lab, "istio_tcp_connections_opened_total", **via_waypoint)
    answer = call(lab, "http://server/through-waypoint?pod=server")
    assert answer is not None, "the call through the waypoint failed"
    assert not answer["peer"].startswith("127.0.0.7:")
    assert node2(lab, "istio_tcp_connections_opened_total", **via_waypoint) == tunnels_before + 1
    assert node2(lab, "istio_tcp_connections_opened_total", **SAME_NODE) == fast_before


def ask(proc: subprocess.Popen[bytes], path: str) -> dict[str, Any]:
    """One request on the long-lived connection; its answer (bounded wait)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{path}\n".encode())
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], WAIT_SECONDS)
    assert ready, f"no answer to {path} within {WAIT_SECONDS}s"
    line = proc.stdout.readline()
    assert line, f"the client exited instead of answering {path}"
    answer: dict[str, Any] = json.loads(line)
    return answer


def test_an_open_fast_connection_survives_agent_restart_and_ztunnel_handover(
    lab: Lab, server_ip: str
) -> None:
    proc = lab.spawn_in_pod(
        CLIENT, ["python", "-c", ON_DEMAND, server_ip], capture=True, stdin=subprocess.PIPE
    )
    try:
        answers = [ask(proc, f"before-{i}") for i in range(3)]
        lab.restart_component("node-2", "agent")
        answers += [ask(proc, f"after-agent-{i}") for i in range(2)]
        lab.restart_component("node-2", "ztunnel")
        answers += [ask(proc, f"after-handover-{i}") for i in range(3)]
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=WAIT_SECONDS) == 0
    finally:
        proc.kill()
        proc.wait()
    assert [a["body_bytes"] for a in answers] == [50000] * 8
    assert len({a["peer"] for a in answers}) == 1 and answers[0]["peer"].startswith("127.0.0.7:")
    # The old generation drained it: its access line counts what went through the kernel.
    source = f"src.addr={lab.load_plan().pod(CLIENT).address}:{answers[0]['port']} "
    wait_until(
        lambda: any(source in line and "outbound complete" in line for line in access(lab)),
        "the long-lived connection's access line",
    )
    (line,) = [line for line in access(lab) if source in line and "outbound complete" in line]
    kernel = re.search(r"kernel_bytes=(\d+)", line)
    assert kernel is not None and int(kernel.group(1)) >= 50000, line
    # New connections take the fast path through the new generation.
    answer = call(lab, f"http://{server_ip}:8080/after-handover")
    assert answer is not None and answer["peer"].startswith("127.0.0.7:")


def access(lab: Lab) -> list[str]:
    return log_text(lab, "ztunnel-node-2").splitlines()


def test_with_two_ztunnel_workers_every_connection_takes_the_fast_path() -> None:
    """Each worker accepts its share of a pod's connections and pairs them with its own
    handle on the agent's maps. A lab of its own, ``amfastw``."""
    require_privileged()
    workers = Lab("amfastw", ztunnel_workers=2, same_node_fast_path=True)
    try:
        workers.up(timeout=120)
        address = workers.load_plan().pod("demo/server").address
        peers = set()
        for _ in range(CALLS_WITH_WORKERS):
            result = workers.run(CLIENT, ["python", "-c", KEEP_ALIVE, address])
            assert result.returncode == 0, result.stderr
            answers = json.loads(result.stdout)
            assert all(a["peer"].startswith("127.0.0.7:") for a in answers), answers
            peers.add(answers[0]["peer"])
        assert len(peers) == CALLS_WITH_WORKERS
        wait_until(
            lambda: (
                node2(workers, "istio_tcp_connections_closed_total", **SAME_NODE)
                >= CALLS_WITH_WORKERS
            ),
            "every connection to be counted",
        )
        worker_lines = [
            line
            for line in log_text(workers, "ztunnel-node-2").splitlines()
            if "outbound complete" in line and "via=same_node" in line
        ]
        kernel = [int(m.group(1)) for line in worker_lines if (m := KERNEL.search(line))]
        assert len(kernel) >= CALLS_WITH_WORKERS and all(k >= 100000 for k in kernel), kernel
    finally:
        workers.down(quiet=True)


CALLS_WITH_WORKERS = 8
KERNEL = re.compile(r"kernel_bytes=(\d+)")
