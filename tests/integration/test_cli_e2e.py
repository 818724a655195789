"""`ambimesh status` and `ambimesh ztunnel-config` as users run them (`python -m ambimesh`
in a subprocess), against a real lab: its ztunnels' admin ports and agents' metrics
reached inside the node namespaces, the controller over TLS in the fabric namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import yaml

from ambimesh.lab.lab import Lab
from tests.integration.labs import log_text, running_lab, wait_until

pytestmark = pytest.mark.privileged

LAB_NAME = "amcli"
NODES = ["node-1", "node-2"]
ENROLLED_NAMESPACE = "demo"  # ambient by its label in the bundled config; legacy is not

HELD_OPEN = """
import socket, sys
s = socket.create_connection(("server", 80), timeout=30)
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LAB_NAME, l4_only=True) as built:
        yield built


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambimesh", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def parsed(*argv: str) -> Any:
    result = cli(*argv, "--lab", LAB_NAME, "--output", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def enrolled(lab: Lab, node: str) -> set[str]:
    pods = lab.load_plan().pods
    return {p.ref for p in pods if p.node == node and p.namespace == ENROLLED_NAMESPACE}


def test_status_lists_nodes_pods_bpf_programs_and_certificates(lab: Lab) -> None:
    status = parsed("status")
    assert status["problems"] == []
    assert status["controller"]["reachable"], status["controller"]
    assert [n["name"] for n in status["nodes"]] == NODES
    now = time.time()
    for node in status["nodes"]:
        pods = enrolled(lab, node["name"])
        assert pods, "the bundled lab has enrolled pods on every node"
        assert {p["pod"] for p in node["pods"]} == pods
        assert all(p["hbone_serving"] for p in node["pods"])
        agent = node["agent"]
        assert agent["enrolled_pods"] == len(pods)
        assert agent["pending_pods"] == 0
        # Each enrolled pod has at least its cgroup's connect4 and its netns' sk_lookup.
        assert agent["bpf_programs_attached"] >= 2 * len(pods)
        identities = {p["identity"] for p in node["pods"]}
        assert {c["identity"] for c in node["certificates"]} == identities
        for cert in node["certificates"]:
            assert datetime.fromisoformat(cert["expires"]).timestamp() > now

    table = cli("status", "--lab", LAB_NAME)
    assert table.returncode == 0, table.stderr
    for node in NODES:
        assert any(line.split()[:3] == [node, "up", "up"] for line in table.stdout.splitlines())
    assert "demo/client" in table.stdout and "0 problem(s)" in table.stdout


def test_workloads_show_the_client_address(lab: Lab) -> None:
    client = lab.load_plan().pod("demo/client")
    table = cli("ztunnel-config", "workloads", "--lab", LAB_NAME, "--node", "node-2")
    assert table.returncode == 0, table.stderr
    row = next(line.split() for line in table.stdout.splitlines() if " client " in line)
    assert row[:5] == ["node-2", "demo", "client", client.address, "node-1"]
    data = parsed("ztunnel-config", "workloads")
    assert list(data) == NODES
    for workloads in data.values():
        by_name = {(w["namespace"], w["name"]): w for w in workloads}
        assert by_name[("demo", "client")]["addresses"] == [client.address]


def test_json_and_yaml_outputs_agree(lab: Lab) -> None:
    for view in ("workloads", "services", "policies", "certs"):
        args = ("ztunnel-config", view, "--lab", LAB_NAME)
        as_yaml = cli(*args, "--output", "yaml")
        assert as_yaml.returncode == 0, as_yaml.stderr
        assert yaml.safe_load(as_yaml.stdout) == parsed(*args[:2]), view
    policies = parsed("ztunnel-config", "policies", "--node", "node-2")["node-2"]
    assert {"kind": "PeerAuthentication", "name": "default", "mode": "STRICT"}.items() <= (
        policies[0].items()
    )


def test_connections_show_a_connection_while_it_is_open(lab: Lab) -> None:
    plan = lab.load_plan()
    client = lab.spawn_in_pod(
        "demo/client", ["python", "-c", HELD_OPEN], capture=True, stdin=subprocess.PIPE
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        # ztunnel reports the pod's address (the app's socket is on 127.0.0.1, redirected).
        source = f"{plan.pod('demo/client').address}:{client.stdout.readline().decode().strip()}"
        # ztunnel lists a connection once its upstream is open, just after the accept.
        try:
            wait_until(
                lambda: any(
                    c["source"] == source for c in parsed("ztunnel-config", "connections")["node-1"]
                ),
                f"ztunnel on node-1 to list the connection from {source}",
            )
        except AssertionError as exc:
            tail = "\n".join(log_text(lab, "ztunnel-node-1").splitlines()[-10:])
            raise AssertionError(
                f"{exc}; client exit {client.poll()}; ztunnel log:\n{tail}"
            ) from None
        connections = parsed("ztunnel-config", "connections")
        outbound = [c for c in connections["node-1"] if c["source"] == source]
        assert [(c["direction"], c["via"]) for c in outbound] == [("outbound", "hbone")]
        assert outbound[0]["labels"]["destination_workload"] == "server"
        assert any(
            c["direction"] == "inbound" and c["labels"]["source_workload"] == "client"
            for c in connections["node-2"]
        )
        table = cli("ztunnel-config", "connections", "--lab", LAB_NAME, "--node", "node-1")
        assert any(source in line and "mutual_tls" in line for line in table.stdout.splitlines())
        client.stdin.write(b"done\n")
        client.stdin.flush()
        assert client.wait(timeout=10) == 0
    finally:
        client.kill()
        client.wait()
    wait_until(
        lambda: all(
            c["source"] != source for c in parsed("ztunnel-config", "connections")["node-1"]
        ),
        "the closed connection to leave ztunnel's live view",
    )


def test_an_unknown_node_or_lab_is_a_clear_error(lab: Lab) -> None:
    unknown = cli("ztunnel-config", "certs", "--lab", LAB_NAME, "--node", "node-9")
    assert unknown.returncode == 1
    assert f"no node 'node-9' in lab '{LAB_NAME}'; its nodes: node-1, node-2" in unknown.stderr
    assert unknown.stdout == ""
    wrong = cli("status", "--lab", "amclinone")
    assert wrong.returncode == 1
    assert "lab 'amclinone' is not up" in wrong.stderr
    assert LAB_NAME in wrong.stderr  # among the labs that are up
    assert "Traceback" not in unknown.stderr + wrong.stderr


def test_ztunnel_down_is_a_clear_error(lab: Lab) -> None:
    lab.kill_component("node-2", "ztunnel")
    try:
        down = cli("ztunnel-config", "certs", "--lab", LAB_NAME, "--node", "node-2")
        assert down.returncode == 1
        assert (
            "cannot reach ztunnel admin at 127.0.0.1:15000 on node node-2" in down.stderr
            and f"ambimesh lab --name {LAB_NAME} status" in down.stderr
        )
        status = cli("status", "--lab", LAB_NAME, "--output", "json")
        assert status.returncode == 1
        nodes = {n["name"]: n for n in json.loads(status.stdout)["nodes"]}
        assert not nodes["node-2"]["ztunnel"]["reachable"]
        assert nodes["node-1"]["ztunnel"]["reachable"]
        assert "cannot reach ztunnel admin" in status.stderr
    finally:
        lab.start_component("node-2", "ztunnel")
        lab.wait_ready()
