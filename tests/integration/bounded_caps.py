"""Run a probe module as uid 0 with only a given capability bounding set, on scratch
node resources (cgroup, netns, bpffs pin dir) of the test's own.

The capability tests (node DaemonSet lists, the agent's restart without GET_FD_BY_ID)
check kernel calls under exactly the capabilities the manifests grant; ``setpriv``
(util-linux) sets the bounding set, the probe prints one JSON object as its last line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from bpf.loader import DEFAULT_BPFFS, cgroup2_mount, ensure_bpffs
from tests.integration.privileged import require_privileged

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ScratchNode:
    cgroup: str
    netns: str
    pins: str


@contextlib.contextmanager
def scratch_node(prefix: str) -> Iterator[ScratchNode]:
    """A cgroup, a netns and a pin dir named `prefix` + random hex, all removed after."""
    require_privileged()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    ensure_bpffs()
    tag = f"{prefix}{secrets.token_hex(4)}"
    cgroup = os.path.join(cgroup2_mount(), tag)
    os.mkdir(cgroup)
    netns.create(tag)
    node = ScratchNode(cgroup, tag, f"{DEFAULT_BPFFS}/{tag}")
    try:
        yield node
    finally:
        shutil.rmtree(node.pins, ignore_errors=True)
        netns.remove(tag)
        os.rmdir(cgroup)


def run_bounded(capabilities: list[str], module: str, *args: str) -> dict[str, Any]:
    """`python -m module args` with `capabilities` as its whole bounding set; its report."""
    bounding = ",".join(["-all", *(f"+{c.lower()}" for c in capabilities)])
    result = subprocess.run(
        [
            *("setpriv", f"--bounding-set={bounding}", "--inh-caps=-all"),
            *(sys.executable, "-m", module, *args),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert isinstance(report, dict), result.stdout
    return report
