"""Control-plane outages and agent restarts stay invisible to traffic (real lab: netns,
eBPF, mTLS, gRPC, processes).

Certificates live 30 s here (renewed every 15 s), so a 20 s controller outage that starts
right after a renewal has the next renewal fail inside it and succeed once the controller
is back, before the old certificate expires. Traffic throughout: long-lived connections
streaming both ways and a new connection every 50 ms (the handover test's driver), from
demo/client on node-1 to an echo server in demo/server on node-2, by pod IP.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from typing import Any

import pytest

from ambimesh.lab.lab import AGENT_METRICS_PORT, METRICS_PORT, READINESS_PORT, Lab
from ambimesh.lab.netclient import http_get
from tests.integration.labs import accepts, log_text, wait_until, write_config
from tests.integration.privileged import require_privileged
from tests.integration.test_handover_e2e import DRIVER, ECHO, readline_within

pytestmark = pytest.mark.privileged

LAB_NAME = "amout"
NODES = ("node-1", "node-2")
CERT_TTL = 30
OUTAGE_SECONDS = 20.0
ECHO_PORT = 9000
LONG_LIVED = 10
ADMIN_PORT = 15000
RENEWAL_FAILURES = "ambimesh_certificate_renewal_failures_total"
STREAM_UP = " up (config version "  # mesh.push_client, once per stream
COMPONENTS = ("agent", "ztunnel")
MARKER_SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: outage-marker
  namespace: demo
spec:
  clusterIP: 198.18.128.99
  selector:
    app: outage-marker
  ports:
    - port: 81
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_privileged()
    lab = Lab(LAB_NAME, cert_ttl=CERT_TTL)
    try:
        lab.up()
        yield lab
    finally:
        lab.down(quiet=True)


class Traffic:
    """The driver's verdict once stopped: long-lived connections and new ones."""

    summary: dict[str, Any]


@contextmanager
def traffic(lab: Lab) -> Iterator[Traffic]:
    """Echo server in demo/server, driver in demo/client; on exit, stop and collect."""
    server = lab.load_plan().pod("demo/server")
    result = Traffic()
    echo = lab.spawn_in_pod("demo/server", ["python", "-c", ECHO, str(ECHO_PORT)], capture=True)
    driver = None
    try:
        wait_until(partial(accepts, server.netns, ECHO_PORT), "the echo server")
        driver = lab.spawn_in_pod(
            "demo/client",
            ["python", "-c", DRIVER, server.address, str(ECHO_PORT), str(LONG_LIVED)],
            capture=True,
            stdin=subprocess.PIPE,
        )
        assert readline_within(driver, 60).strip() == b"ready"
        yield result
        assert driver.stdin is not None
        driver.stdin.write(b"stop\n")
        driver.stdin.flush()
        out, err = driver.communicate(timeout=90)
        assert driver.returncode == 0, err.decode()
        result.summary = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        for proc in (driver, echo):
            if proc is not None:
                proc.kill()
                proc.wait()


def assert_no_failures(summary: dict[str, Any], min_new: int) -> None:
    broken = [c for c in summary["long"] if c["error"] is not None]
    assert broken == [], f"{len(broken)} long-lived connections broke, e.g. {broken[:3]}"
    assert all(c["sent"] > 0 and c["got"] == c["sent"] for c in summary["long"])
    failed = [r for r in summary["new"] if r is not None]
    assert failed == [], f"{len(failed)} of {len(summary['new'])} new connections failed: {failed}"
    assert len(summary["new"]) >= min_new, "too few new connections to mean anything"


def get(lab: Lab, node: str, host: str, port: int, path: str) -> tuple[int, str]:
    return http_get(lab.load_plan().node(node).netns, host, port, path, 2.0)


def node_address(lab: Lab, node: str) -> str:
    return lab.load_plan().node(node).address


def cert_expiries(lab: Lab, node: str) -> dict[str, datetime]:
    """ztunnel's certificates, from its admin endpoint: identity -> not after."""
    _, body = get(lab, node, "127.0.0.1", ADMIN_PORT, "/config_dump")
    return {sid: datetime.fromisoformat(t) for sid, t in json.loads(body)["certificates"].items()}


def all_renewed_since(lab: Lab, before: dict[str, dict[str, datetime]]) -> bool:
    """Every identity on every node has a later certificate than in ``before``."""
    for node, old in before.items():
        now = cert_expiries(lab, node)
        if not old or any(now.get(sid, when) <= when for sid, when in old.items()):
            return False
    return True


def sample(lab: Lab, node: str, port: int, name: str) -> float:
    """Sum of the samples of metric ``name`` on the node's ``port``."""
    _, body = get(lab, node, node_address(lab, node), port, "/metrics")
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith((f"{name} ", f"{name}{{"))
    ]
    assert values, f"{name} missing from {node}:{port}/metrics"
    return sum(values)


def renewal_failed(lab: Lab, node: str, failures_before: float) -> bool:
    return sample(lab, node, METRICS_PORT, RENEWAL_FAILURES) > failures_before


def enrolled(lab: Lab, node: str) -> int:
    """The node's pods in namespace demo (enrolled), but not the waypoint (it speaks HBONE
    itself and is never captured)."""
    pods = lab.load_plan().pods
    return sum(1 for p in pods if p.node == node and p.namespace == "demo" and not p.waypoint)


def node_healthy(lab: Lab, node: str) -> bool:
    """ztunnel ready and serving metrics, the agent still enrolled and synced."""
    address = node_address(lab, node)
    return (
        get(lab, node, address, READINESS_PORT, "/healthz/ready")[0] == 200
        and sample(lab, node, AGENT_METRICS_PORT, "ambimesh_config_synced") == 1
        and sample(lab, node, AGENT_METRICS_PORT, "ambimesh_enrolled_pods") == enrolled(lab, node)
        and sample(lab, node, METRICS_PORT, "ambimesh_certificate_expiry_seconds") > 0
    )


def churn(lab: Lab) -> dict[str, int]:
    """How often each node took a pod in or let one go, by its logs."""
    counts: dict[str, int] = {}
    for node in NODES:
        for component, phrase in (
            ("agent", "enrolled pod "),
            ("agent", "released pod "),
            ("ztunnel", "serving pod "),
            ("ztunnel", "stopped serving pod "),
        ):
            key = f"{component}-{node}: {phrase.strip()}"
            counts[key] = log_text(lab, f"{component}-{node}").count(phrase)
    return counts


def config_version(lab: Lab, node: str) -> str:
    _, body = get(lab, node, "127.0.0.1", ADMIN_PORT, "/config_dump")
    version: str = json.loads(body)["version"]
    return version


def push_streams(lab: Lab) -> dict[str, int]:
    """How often each node component's push stream came up (and applied a snapshot)."""
    return {
        f"{c}-{n}": log_text(lab, f"{c}-{n}").count(STREAM_UP) for n in NODES for c in COMPONENTS
    }


def test_controller_outage_with_a_renewal_inside_it(lab: Lab) -> None:
    # A config change first, so the restarted controller's versions (from 1 again) are
    # "older" than what the nodes have: they must take them all the same.
    write_config(lab.config_dir / "outage.yaml", MARKER_SERVICE)
    wait_until(lambda: all(config_version(lab, n) == "2" for n in NODES), "config version 2")
    with traffic(lab) as run:
        # Line up the outage with the renewal cycle: right after every identity renewed.
        first = {node: cert_expiries(lab, node) for node in NODES}
        wait_until(partial(all_renewed_since, lab, first), "a round of certificate renewals")
        before_outage = {node: cert_expiries(lab, node) for node in NODES}
        failures_before = {n: sample(lab, n, METRICS_PORT, RENEWAL_FAILURES) for n in NODES}
        churn_before, streams_before = churn(lab), push_streams(lab)
        lab.stop_controller()
        outage_end = time.monotonic() + OUTAGE_SECONDS

        # The next renewal falls inside the outage and fails; everything else carries on.
        for node in NODES:
            wait_until(
                partial(renewal_failed, lab, node, failures_before[node]),
                f"a failed renewal on {node}",
            )
        assert time.monotonic() < outage_end, "the renewal came after the outage: retune"
        for node in NODES:
            assert node_healthy(lab, node), f"{node} is unhealthy without its controller"
        time.sleep(max(0.0, outage_end - time.monotonic()))
        assert cert_expiries(lab, "node-1") == before_outage["node-1"]  # the old one serves

        lab.start_controller()
        wait_until(partial(all_renewed_since, lab, before_outage), "renewals after the outage")
        # Every node component resyncs from the restarted controller's full snapshot.
        wait_until(
            lambda: all(push_streams(lab)[k] > v for k, v in streams_before.items()),
            "every node to reconnect to the controller",
        )
        wait_until(lambda: all(config_version(lab, n) == "1" for n in NODES), "config version 1")
        time.sleep(1.0)  # traffic keeps flowing after the resync
    (lab.config_dir / "outage.yaml").unlink()

    assert_no_failures(run.summary, min_new=int(OUTAGE_SECONDS * 10))
    for node in NODES:
        ztunnel = log_text(lab, f"ztunnel-{node}")
        assert "renewing the certificate for" in ztunnel and "failed (try 1)" in ztunnel
        assert "EXPIRED" not in ztunnel, f"{node}'s certificate expired during the outage"
        assert node_healthy(lab, node)
    # No pod was taken out and in again, by the agent or by ztunnel.
    assert churn(lab) == churn_before
    # The controller ended its streams itself on SIGTERM instead of leaving gRPC to cancel them.
    assert "Traceback" not in log_text(lab, "controller")


def test_rolling_agent_restart_fails_no_connection(lab: Lab) -> None:
    with traffic(lab) as run:
        serving_before = {n: log_text(lab, f"ztunnel-{n}").count("serving pod ") for n in NODES}
        for node in NODES:
            lab.restart_component(node, "agent")
            time.sleep(1.0)  # traffic flows through the new agent's capture
    assert_no_failures(run.summary, min_new=20)
    for node in NODES:
        assert log_text(lab, f"agent-{node}").count("agent stopped; pods stay captured") >= 1
        # ztunnel kept every pod: the new agent re-sent them and got the same listeners.
        assert log_text(lab, f"ztunnel-{node}").count("serving pod ") == serving_before[node]
        assert "stopped serving pod" not in log_text(lab, f"ztunnel-{node}")
        assert node_healthy(lab, node)
