"""An agent restart needs no ``GET_FD_BY_ID``: pinned maps and programs are opened by path.

Linux 6.1 (Debian 12) allows ``BPF_{MAP,PROG}_GET_FD_BY_ID`` only with CAP_SYS_ADMIN,
which the agent does not have; this machine's kernel allows them with CAP_BPF. So the
restart runs in a child (no_get_fd_by_id_probe.py) whose seccomp filter refuses those
commands with EPERM, as 6.1 does, under the agent's capability bounding set: the second
loader must reuse the first's maps and leave only its own programs on the cgroup.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import netns

from ambimesh.install.manifests import AGENT_CAPABILITIES
from bpf.loader import DEFAULT_BPFFS, cgroup2_mount, ensure_bpffs
from tests.integration.privileged import require_privileged

pytestmark = pytest.mark.privileged
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def node() -> Iterator[tuple[str, str, str]]:
    """A cgroup, a netns and a pin dir of this test's own."""
    require_privileged()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    ensure_bpffs()
    tag = f"ambfdid{secrets.token_hex(4)}"
    cgroup = os.path.join(cgroup2_mount(), tag)
    os.mkdir(cgroup)
    netns.create(tag)
    pins = f"{DEFAULT_BPFFS}/{tag}"
    try:
        yield cgroup, tag, pins
    finally:
        shutil.rmtree(pins, ignore_errors=True)
        netns.remove(tag)
        os.rmdir(cgroup)


def test_restart_reopens_pins_without_get_fd_by_id(node: tuple[str, str, str]) -> None:
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in AGENT_CAPABILITIES)])
    result = subprocess.run(
        [
            "setpriv",
            f"--bounding-set={bounding}",
            "--inh-caps=-all",
            sys.executable,
            "-m",
            "tests.integration.no_get_fd_by_id_probe",
            *node,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report.pop("get_fd_by_id refused") is True
    errors = {step: error for step, error in report.items() if isinstance(error, str)}
    assert errors == {}, result.stderr
    assert report["second sees the first's map entry"] is True
    # connect4/6, sockops, getpeername4/6, getsockopt: the second loader's, the first's gone.
    assert report["attached"] == report["ours"]
    assert len(report["ours"]) == 6
