"""The lab's own promises: `exec` is the pod's process, `up` recovers from a crashed lab,
`down` leaves nothing behind. Real namespaces, cgroups, pins and processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import netns

from ambimesh.lab import cgroups
from ambimesh.lab.demo import fetch_in_pod
from ambimesh.lab.lab import Lab
from tests.integration.privileged import require_privileged

pytestmark = pytest.mark.privileged

LAB_NAME = "amlife"


def leftovers(lab: Lab) -> list[str]:
    found = [f"netns {n}" for n in netns.listnetns() if n.startswith(f"{lab.name}-")]
    etc = Path("/etc/netns")
    if etc.is_dir():
        found += [
            f"/etc/netns/{p.name}" for p in etc.iterdir() if p.name.startswith(f"{lab.name}-")
        ]
    for path in (cgroups.lab_root(lab.name), lab.bpf_pins, lab.state):
        if path.exists():
            found.append(str(path))
    return found


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambimesh", "lab", "--name", LAB_NAME, *argv],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_exec_up_after_a_crash_and_down() -> None:
    require_privileged()
    lab = Lab(LAB_NAME)
    try:
        plan = lab.up()
        pod = plan.pod("demo/client")

        hosts = cli("exec", "client", "--", "cat", "/etc/hosts")
        assert hosts.returncode == 0, hosts.stderr
        assert f"{plan.services[0].vip} server server.demo" in hosts.stdout
        cgroup = cli("exec", "demo/client", "--", "cat", "/proc/self/cgroup")
        assert f"/pod{pod.uid}" in cgroup.stdout
        addresses = cli("exec", "client", "--", "ip", "-4", "-o", "addr", "show", "eth0")
        assert f"{pod.address}/24" in addresses.stdout
        unknown = cli("exec", "nope", "--", "true")
        assert unknown.returncode == 1 and "'nope' is not a pod of this lab" in unknown.stderr

        # A crash: every process of the lab dies, namespaces, pins and state stay behind.
        cgroups.kill(cgroups.lab_root(lab.name))
        assert leftovers(lab)
        lab.up()
        assert fetch_in_pod(lab, "demo/client", "http://server/after-crash").returncode == 0
    finally:
        lab.down(quiet=True)
    assert leftovers(lab) == []
    status = cli("status")
    assert status.returncode == 1 and "is not up" in status.stderr
