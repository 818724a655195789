"""The seed's 90/10 canary through a real waypoint, in the lab: real netns, eBPF capture,
ztunnels sending the Service's traffic as HBONE to the waypoint pod, the waypoint routing
HTTP by the seed's VirtualService and DestinationRule (unchanged) to subset pods."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambimesh.lab.capture import fabric_capture
from ambimesh.lab.demo import istio_metrics
from ambimesh.lab.lab import METRICS_PORT, Lab, bundled_config_dir
from ambimesh.lab.netclient import http_get
from tests.integration.labs import metric, running_lab

pytestmark = pytest.mark.privileged

LAB_NAME = "amwp"
EXAMPLES = Path(__file__).resolve().parents[2] / "ambimesh" / "lab" / "examples"
CALLS = 300
WAYPOINT_SA = "spiffe://cluster.local/ns/default/sa/waypoint"

# Runs in the client pod: CALLS requests to my-service, one connection each; prints the
# answering pod of each, or the error.
CALLER = """
import http.client, json, sys
seen = []
for i in range(int(sys.argv[1])):
    try:
        conn = http.client.HTTPConnection("my-service.default", 80, timeout=10)
        conn.request("GET", f"/canary-{i}")
        response = conn.getresponse()
        body = response.read()
        ok = response.status == 200
        seen.append(json.loads(body)["pod"] if ok else f"HTTP {response.status}")
        conn.close()
    except Exception as exc:
        seen.append(repr(exc))
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    config = tmp_path_factory.mktemp("config")
    for path in [*bundled_config_dir().glob("*.yaml"), EXAMPLES / "canary.yaml"]:
        shutil.copy(path, config / path.name)
    with running_lab(LAB_NAME, config) as built:
        yield built


def waypoint_metrics(lab: Lab) -> list[str]:
    pod = lab.load_plan().pod("default/waypoint")
    status, body = http_get(pod.netns, pod.address, METRICS_PORT, "/metrics")
    assert status == 200
    return body.splitlines()


def test_the_seed_canary_splits_90_10_through_the_waypoint(lab: Lab, tmp_path: Path) -> None:
    plan = lab.load_plan()
    with fabric_capture(plan, "node-1", tmp_path / "fabric.pcap") as captured:
        result = lab.run("demo/client", ["python", "-c", CALLER, str(CALLS)], timeout=240)
    assert result.returncode == 0, result.stderr
    seen: list[str] = json.loads(result.stdout)
    counts = {name: seen.count(name) for name in set(seen)}
    assert set(counts) <= {"my-service-v1", "my-service-v2"}, f"failures: {counts}"
    share = counts.get("my-service-v2", 0) / CALLS
    # Binomial(300, 0.1): sd 0.017; these bounds are ~3.5 sd, a regression (50/50, 100/0)
    # falls far outside.
    assert 0.04 <= share <= 0.17, f"v2 got {share:.0%} of {CALLS} calls: {counts}"
    assert 15008 in captured[0].ports() and 8080 not in captured[0].ports()

    lines = waypoint_metrics(lab)
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
