"""`ambimesh uninstall` on real BPF: what a dead agent left in force is all removed.

An agent enrolls a pod (cgroup programs, a pinned sk_lookup link, pinned maps) and
attaches getsockopt to ztunnel's cgroup, then dies (``release()``), leaving capture in
force as it is meant to. Uninstall, scoped to this test's own cgroup subtree, pin dir and
socket directory (other labs may run on this machine), must leave nothing behind: traffic
then flows as if ambimesh had never been there. A second run finds nothing and succeeds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.uninstall import LOCK_NAME, uninstall
from bpf.loader import MeshBpf, _Libbpf, cgroup2_mount
from bpf.sweep import CGROUP_ATTACH_TYPES, cgroup_programs
from tests.integration.test_bpf_datapath import PEER, POD_A, Lab, _remove_cgroup, accept
from tests.integration.test_bpf_pinning import (
    cgroup_programs as attached_ids,
)
from tests.integration.test_bpf_pinning import (
    eventually,
    lab,  # noqa: F401  (fixture)
    pin_dir,  # noqa: F401  (fixture)
    sk_lookup_links,
)

pytestmark = pytest.mark.privileged

# From include/uapi/linux/bpf.h.
_PROG_CGROUP_SOCK_ADDR = 18
_INET4_CONNECT = 10
_ALLOW_MULTI = 1 << 1


@pytest.fixture
def node_root(lab: Lab) -> Iterator[str]:  # noqa: F811
    """A cgroup subtree of this test's own, with a pod and a ztunnel cgroup in it."""
    root = os.path.join(cgroup2_mount(), f"ambimesh-uninstall-{lab.tag}")
    os.mkdir(root)
    for role in ("pod", "ztunnel"):
        path = os.path.join(root, role)
        os.mkdir(path)
        lab.cgroups[role] = path
    try:
        yield root
    finally:
        for role in ("pod", "ztunnel"):
            _remove_cgroup(lab.cgroups.pop(role), cgroup2_mount())
        os.rmdir(root)


def leave_capture_behind(lab: Lab, pin_dir: str, run_dir: Path) -> None:  # noqa: F811
    """What a node looks like after its agent died: everything pinned or attached."""
    run_dir.mkdir()
    (run_dir / "ztunnel.sock").touch()
    (run_dir / LOCK_NAME).touch()
    with MeshBpf(pin_dir=pin_dir) as agent:
        agent.attach_proxy(lab.cgroups["ztunnel"])
        inbound = lab.listener("a", ("0.0.0.0", 15006), cgroup="ztunnel")
        agent.set_inbound_listener(POD_A, inbound.fileno())
        agent.attach_pod(lab.cgroups["pod"], lab.namespaces["a"].fileno(), [POD_A], "pod-a")
        agent.release()
    inbound.close()  # ztunnel is gone too: the pod now fails closed


def test_uninstall_removes_programs_links_pins_and_files_and_is_idempotent(
    lab: Lab,  # noqa: F811
    pin_dir: str,  # noqa: F811
    node_root: str,
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    leave_capture_behind(lab, pin_dir, run_dir)
    netns_fd = lab.namespaces["a"].fileno()
    names = sorted(p.name for c in ("pod", "ztunnel") for p in cgroup_programs(lab.cgroups[c]))
    # The kernel keeps 15 characters: connect4/6 and getpeername4/6 share their names.
    assert names == sorted(
        ["ambimesh_getsoc", "ambimesh_sockop"] + 2 * ["ambimesh_connec", "ambimesh_getpee"]
    )
    assert len(sk_lookup_links(netns_fd)) == 1
    app = lab.listener("a", ("0.0.0.0", 8080))
    blocked = lab.client("peer")
    blocked.settimeout(0.5)
    with pytest.raises(OSError):
        blocked.connect((POD_A, 8080))  # STRICT-style fail closed: no ztunnel listener

    report = uninstall(pin_dir, node_root, str(run_dir / "ztunnel.sock"))

    text = str(report)
    assert text.count("removed program ambimesh_") == 6
    assert f"sk_lookup link pinned at {pin_dir}/links/pod-a" in text
    for cgroup in (lab.cgroups["pod"], lab.cgroups["ztunnel"]):
        assert cgroup_programs(cgroup) == []
        assert all(attached_ids(cgroup, t) == [] for t in CGROUP_ATTACH_TYPES)
    assert eventually(lambda: sk_lookup_links(netns_fd) == [])
    assert not os.path.lexists(pin_dir)
    assert not run_dir.exists()

    # Traffic as without ambimesh: inbound reaches the app, outbound is not redirected.
    client = lab.client("peer")
    client.connect((POD_A, 8080))
    with accept(app) as conn:
        assert conn.getsockname() == (POD_A, 8080)
    peer_app = lab.listener("peer", (PEER, 9090))
    out = lab.client("a", cgroup="pod")
    out.connect((PEER, 9090))
    with accept(peer_app) as conn:
        assert conn.getpeername() == (POD_A, out.getsockname()[1])
    assert out.getpeername() == (PEER, 9090)

    again = uninstall(pin_dir, node_root, str(run_dir / "ztunnel.sock"))
    assert again.removed == []
    assert str(again) == "nothing of ambimesh was left on this node"


def test_uninstall_leaves_other_programs_on_the_cgroup(
    lab: Lab,  # noqa: F811
    node_root: str,
    tmp_path: Path,
) -> None:
    """Only ``ambimesh_*`` programs go: another one sharing the cgroup (ALLOW_MULTI) stays."""
    from bcc import BPF  # Debian's python3-bpfcc, present when privileged tests run

    other = BPF(text=b"int other_connect4(struct bpf_sock_addr *ctx) { return 1; }")
    libbpf = _Libbpf()
    fn = other.load_func(b"other_connect4", _PROG_CGROUP_SOCK_ADDR, attach_type=_INET4_CONNECT)
    cgroup = os.open(lab.cgroups["pod"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        libbpf.prog_attach(fn.fd, cgroup, _INET4_CONNECT, _ALLOW_MULTI)
        with MeshBpf() as agent:
            agent.attach_pod(lab.cgroups["pod"], lab.namespaces["a"].fileno(), [POD_A])
            agent.release()
        assert len(attached_ids(lab.cgroups["pod"], _INET4_CONNECT)) == 2

        uninstall(str(tmp_path / "no-pins"), node_root, str(tmp_path / "run" / "z.sock"))

        assert cgroup_programs(lab.cgroups["pod"]) == []
        other_id = libbpf.prog_id_and_name(fn.fd)[0]
        assert attached_ids(lab.cgroups["pod"], _INET4_CONNECT) == [other_id]
    finally:
        with contextlib.suppress(OSError):
            libbpf.prog_detach(fn.fd, cgroup, _INET4_CONNECT)
        os.close(cgroup)
        other.cleanup()
