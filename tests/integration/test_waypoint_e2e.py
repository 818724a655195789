"""The seed's 90/10 canary through a real waypoint, in the lab: real netns, eBPF capture,
ztunnels sending the Service's traffic as HBONE to the waypoint pod, the waypoint routing
HTTP by the seed's VirtualService and DestinationRule (unchanged) to subset pods."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ambimesh.lab.capture import fabric_capture
from ambimesh.lab.demo import (
    CANARY_URL,
    CANARY_WAYPOINT,
    istio_metrics,
    split_calls,
    waypoint_metrics,
)
from ambimesh.lab.lab import Lab
from tests.integration.labs import metric, running_lab, wait_until

pytestmark = pytest.mark.privileged

LAB_NAME = "amwp"
CALLS = 300
WAYPOINT_SA = "spiffe://cluster.local/ns/default/sa/waypoint"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LAB_NAME, examples=("canary",)) as built:
        yield built


def test_the_seed_canary_splits_90_10_through_the_waypoint(lab: Lab, tmp_path: Path) -> None:
    plan = lab.load_plan()
    with fabric_capture(plan, "node-1", tmp_path / "fabric.pcap") as captured:
        seen = split_calls(lab, "demo/client", CANARY_URL, CALLS)
    counts = {name: seen.count(name) for name in set(seen)}
    assert set(counts) <= {"my-service-v1", "my-service-v2"}, f"failures: {counts}"
    share = counts.get("my-service-v2", 0) / CALLS
    # Binomial(300, 0.1): sd 0.017; these bounds are ~3.5 sd, a regression (50/50, 100/0)
    # falls far outside.
    assert 0.04 <= share <= 0.17, f"v2 got {share:.0%} of {CALLS} calls: {counts}"
    assert 15008 in captured[0].ports() and 8080 not in captured[0].ports()

    lines = waypoint_metrics(lab, CANARY_WAYPOINT)
    assert metric(lines, "istio_requests_total", reporter="waypoint", response_code="200") >= CALLS
    # The subset pods' ztunnels saw the waypoint, not the client, as their peer.
    v1_node = plan.pod("default/my-service-v1").node
    assert (
        metric(
            istio_metrics(lab, v1_node),
            "istio_tcp_connections_opened_total",
            reporter="destination",
            source_principal=WAYPOINT_SA,
            destination_workload="my-service-v1",
        )
        >= 1
    )


# Prints "<status> <body>" of a GET from inside a pod, or "error <what>".
STATUS_PROBE = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
        print(response.status, response.read().decode()[:200])
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode()[:200])
except Exception as exc:
    print("error", repr(exc))
"""
POLICY_FILE = "l7-e2e.yaml"


def probe(lab: Lab, url: str) -> str:
    return lab.run("demo/client", ["python", "-c", STATUS_PROBE, url]).stdout.strip()


@pytest.fixture
def config_file(lab: Lab) -> Iterator[Path]:
    """A runtime config file of the test's own, removed after it."""
    path = lab.config_dir / POLICY_FILE
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_l7_policy_denies_with_403_and_the_pods_cannot_be_dialed_around_it(
    lab: Lab, config_file: Path
) -> None:
    v1 = lab.load_plan().pod("default/my-service-v1")
    direct = f"http://{v1.address}:8080/direct"
    assert probe(lab, direct).startswith("200 "), "without L7 policy the pod is reachable"
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "default"},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "my-service"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
        },
    }
    config_file.write_text(yaml.safe_dump(policy))
    wait_until(
        lambda: probe(lab, "http://my-service.default/admin/x") == "403 RBAC: access denied",
        "the waypoint to deny /admin with 403",
    )
    assert probe(lab, "http://my-service.default/fine").startswith("200 ")
    # The Service is protected at L7, so its pods take traffic only from the waypoint.
    wait_until(lambda: probe(lab, direct).startswith("error"), "direct calls to be refused")
    config_file.unlink()
    wait_until(lambda: probe(lab, direct).startswith("200 "), "the pod to be reachable again")


def test_a_route_change_applies_live(lab: Lab) -> None:
    """Nothing restarts: the waypoint takes the new weights from the next push."""
    path = lab.config_dir / "canary.yaml"
    original = path.read_text()
    docs = list(yaml.safe_load_all(original))
    (virtual_service,) = [d for d in docs if d["kind"] == "VirtualService"]
    v1, v2 = virtual_service["spec"]["http"][0]["route"]
    v1["weight"], v2["weight"] = 0, 100
    try:
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        wait_until(
            lambda: set(split_calls(lab, "demo/client", CANARY_URL, 20)) == {"my-service-v2"},
            "every call to go to v2",
        )
    finally:
        path.write_text(original)
    wait_until(
        lambda: "my-service-v1" in split_calls(lab, "demo/client", CANARY_URL, 20),
        "v1 to take calls again",
    )
