"""The node DaemonSet's capability lists are enough, and each entry is needed.

The agent's and ztunnel's kernel calls run in a child (capability_probe.py) as uid 0
whose capability bounding set is exactly the manifests' list (``setpriv``), then that
list minus one capability at a time: the full list must pass every call, and each
smaller one must fail at least one. Measured on this machine's kernel, which is what the
DaemonSet's comments and docs/install.md report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from ambimesh.install.manifests import AGENT_CAPABILITIES, ZTUNNEL_CAPABILITIES
from tests.integration.bounded_caps import run_bounded, scratch_node

pytestmark = pytest.mark.privileged


@pytest.fixture
def node() -> Iterator[dict[str, str]]:
    """A netns with a process of another user in it (a pod), a cgroup, a pin dir."""
    with scratch_node("ambcap") as scratch:
        pod = subprocess.Popen(
            [
                *("ip", "netns", "exec", scratch.netns),
                *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"),
            ]
        )
        try:
            yield {
                "cgroup": scratch.cgroup,
                "netns": scratch.netns,
                "pins": scratch.pins,
                "pid": str(pod.pid),
            }
        finally:
            pod.kill()
            pod.wait()


def probe(capabilities: list[str], role: str, *args: str) -> dict[str, Any]:
    return run_bounded(capabilities, "tests.integration.capability_probe", role, *args)


def wait_for_netns_owner(pid: str) -> None:
    """`sleep` has dropped to uid 65534 (setpriv execs it) before the probe opens its netns."""
    for _ in range(100):
        if os.stat(f"/proc/{pid}").st_uid == 65534:
            return
        subprocess.run(["sleep", "0.05"], check=True)
    raise AssertionError("the pod process never became uid 65534")


def test_agent_needs_exactly_its_capabilities(node: dict[str, str]) -> None:
    wait_for_netns_owner(node["pid"])
    args = (node["cgroup"], node["netns"], node["pins"], node["pid"])
    try:
        full = probe(AGENT_CAPABILITIES, "agent", *args)
        assert {call: err for call, err in full.items() if err} == {}
        assert len(full) == 7
        for missing in AGENT_CAPABILITIES:
            shutil.rmtree(node["pins"], ignore_errors=True)
            fewer = probe([c for c in AGENT_CAPABILITIES if c != missing], "agent", *args)
            assert any(fewer.values()), f"the agent works without CAP_{missing}"
    finally:
        shutil.rmtree(node["pins"], ignore_errors=True)


def test_ztunnel_needs_exactly_its_capabilities(node: dict[str, str]) -> None:
    full = probe(ZTUNNEL_CAPABILITIES, "ztunnel", node["netns"])
    assert full == {"setns": None, "netns sysctl": None}
    for missing in ZTUNNEL_CAPABILITIES:
        fewer = probe([c for c in ZTUNNEL_CAPABILITIES if c != missing], "ztunnel", node["netns"])
        assert any(fewer.values()), f"ztunnel works without CAP_{missing}"
