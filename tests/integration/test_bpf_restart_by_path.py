"""An agent restart needs no ``GET_FD_BY_ID``: pinned maps and programs are opened by path.

Linux 6.1 (Debian 12) allows ``BPF_{MAP,PROG}_GET_FD_BY_ID`` only with CAP_SYS_ADMIN,
which the agent does not have; this machine's kernel allows them with CAP_BPF. So the
restart runs in a child (no_get_fd_by_id_probe.py) whose seccomp filter refuses those
commands with EPERM, as 6.1 does, under the agent's capability bounding set: the second
loader must reuse the first's maps and leave only its own programs on the cgroup.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ambimesh.install.manifests import AGENT_CAPABILITIES
from tests.integration.bounded_caps import ScratchNode, run_bounded, scratch_node

pytestmark = pytest.mark.privileged


@pytest.fixture
def node() -> Iterator[ScratchNode]:
    with scratch_node("ambfdid") as node:
        yield node


def test_restart_reopens_pins_without_get_fd_by_id(node: ScratchNode) -> None:
    report = run_bounded(
        AGENT_CAPABILITIES,
        "tests.integration.no_get_fd_by_id_probe",
        node.cgroup,
        node.netns,
        node.pins,
    )
    assert report.pop("get_fd_by_id refused") is True
    errors = {step: error for step, error in report.items() if isinstance(error, str)}
    assert errors == {}
    assert report["second sees the first's map entry"] is True
    # connect4/6, sockops, getpeername4/6, getsockopt: the second loader's, the first's gone.
    assert report["attached"] == report["ours"]
    assert len(report["ours"]) == 6
