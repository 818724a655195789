"""The seed's 90/10 canary through a real waypoint, in the lab: real netns, eBPF capture,
ztunnels sending the Service's traffic as HBONE to the waypoint pod, the waypoint routing
HTTP by the seed's VirtualService and DestinationRule (unchanged) to subset pods."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ambimesh.lab.capture import fabric_capture
from ambimesh.lab.demo import (
    CANARY_URL,
    CANARY_WAYPOINT,
    istio_metrics,
    split_calls,
    waypoint_metrics,
)
from ambimesh.lab.lab import Lab
from tests.integration.labs import metric, running_lab

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
