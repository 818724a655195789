"""agent.discovery: the pod-level cgroup in a process's cgroup path, and find_pod over a
fake /proc tree (no privileges, no real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import discovery
from agent.discovery import PodSandbox, find_pod, pod_cgroup_root

UID = "1c0a5b9e-2f3d-4e5f-8a9b-0c1d2e3f4a5b"
UID_SYSTEMD = UID.replace("-", "_")
OTHER_UID = "99999999-2f3d-4e5f-8a9b-0c1d2e3f4a5b"
CTR = "0123456789abcdef" * 4
MOUNT = Path("/sys/fs/cgroup")


@pytest.mark.parametrize(
    ("path", "uid", "root"),
    [
        # cgroupfs driver
        (f"/kubepods/burstable/pod{UID}/{CTR}", UID, f"/kubepods/burstable/pod{UID}"),
        (f"/kubepods/besteffort/pod{UID}/{CTR}", UID, f"/kubepods/besteffort/pod{UID}"),
        (f"/kubepods/pod{UID}/{CTR}", UID, f"/kubepods/pod{UID}"),
        (f"/kubepods/burstable/pod{UID}", UID, f"/kubepods/burstable/pod{UID}"),
        (f"/kubepods/burstable/pod{UID}/", UID, f"/kubepods/burstable/pod{UID}"),
        (f"kubepods/burstable/pod{UID}/{CTR}", UID, f"/kubepods/burstable/pod{UID}"),
        # the lab's layout
        (
            f"/ambimesh/lab/node-1/kubepods/pod{UID}",
            UID,
            f"/ambimesh/lab/node-1/kubepods/pod{UID}",
        ),
        # systemd driver
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-x.scope",
            UID,
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice",
        ),
        (
            f"/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{CTR}.scope",
            UID,
            f"/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice",
        ),
        # case does not matter
        (
            f"/kubepods/burstable/pod{UID.upper()}/{CTR}",
            UID,
            f"/kubepods/burstable/pod{UID.upper()}",
        ),
        (f"/kubepods/burstable/pod{UID}/{CTR}", UID.upper(), f"/kubepods/burstable/pod{UID}"),
        # another pod's uid
        (f"/kubepods/burstable/pod{OTHER_UID}/{CTR}", UID, None),
        (f"/kubepods.slice/kubepods-pod{OTHER_UID.replace('-', '_')}.slice/x.scope", UID, None),
        # a uid that is only a prefix or a suffix of the segment's
        (f"/kubepods/burstable/pod{UID}0/{CTR}", UID, None),
        (f"/kubepods/burstable/pod{UID[:-1]}/{CTR}", UID, None),
        (f"/kubepods/burstable/pod{UID}.scope/{CTR}", UID, None),
        # not a pod
        ("/system.slice/containerd.service", UID, None),
        ("/init.scope", UID, None),
        ("/", UID, None),
        ("", UID, None),
        ("/kubepods/burstable", UID, None),
        (f"/user.slice/{UID}", UID, None),
    ],
)
def test_pod_cgroup_root(path: str, uid: str, root: str | None) -> None:
    assert pod_cgroup_root(path, uid) == root


# --- find_pod over a fake /proc ---------------------------------------------------------


def add_process(
    proc: Path, pid: str, cgroup: str | None, *, netns: bool = True, v1_only: bool = False
) -> Path:
    entry = proc / pid
    entry.mkdir()
    if cgroup is not None:
        lines = ["12:cpuset:/", "1:name=systemd:/"] if v1_only else []
        if not v1_only:
            lines = ["1:name=systemd:/legacy", f"0::{cgroup}"]
        (entry / "cgroup").write_text("\n".join(lines) + "\n")
    if netns:
        (entry / "ns").mkdir()
        (entry / "ns" / "net").write_text("")
    return entry


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(discovery, "cgroup2_mount", lambda: MOUNT)
    root = tmp_path / "proc"
    root.mkdir()
    add_process(root, "1", "/init.scope")
    add_process(root, "50", "/system.slice/containerd.service")
    add_process(root, "60", f"/kubepods/burstable/pod{OTHER_UID}/{CTR}")
    (root / "sys").mkdir()
    (root / "meminfo").write_text("MemTotal: 1 kB\n")
    return root


def test_find_pod_cgroupfs(proc: Path) -> None:
    add_process(proc, "100", f"/kubepods/burstable/pod{UID}/{CTR}")
    assert find_pod(UID, proc) == PodSandbox(
        pid=100,
        netns_path=str(proc / "100" / "ns" / "net"),
        cgroup_path=MOUNT / "kubepods" / "burstable" / f"pod{UID}",
    )


def test_find_pod_systemd(proc: Path) -> None:
    slice_ = f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice"
    add_process(proc, "4242", f"{slice_}/cri-containerd-x.scope")
    found = find_pod(UID, proc)
    assert found is not None
    assert found.pid == 4242
    assert found.netns_path == str(proc / "4242" / "ns" / "net")
    assert found.cgroup_path == MOUNT / slice_.lstrip("/")


def test_find_pod_any_process_of_the_pod_gives_the_pod_root(proc: Path) -> None:
    add_process(proc, "100", f"/kubepods/pod{UID}/pause")
    add_process(proc, "101", f"/kubepods/pod{UID}/{CTR}")
    found = find_pod(UID, proc)
    assert found is not None
    assert found.pid in (100, 101)
    assert found.netns_path == str(proc / str(found.pid) / "ns" / "net")
    assert found.cgroup_path == MOUNT / "kubepods" / f"pod{UID}"


def test_find_pod_none_when_the_pod_has_no_process(proc: Path) -> None:
    assert find_pod(UID, proc) is None


def test_find_pod_skips_processes_without_netns(proc: Path) -> None:
    add_process(proc, "100", f"/kubepods/pod{UID}/{CTR}", netns=False)
    assert find_pod(UID, proc) is None
    add_process(proc, "101", f"/kubepods/pod{UID}/{CTR}")
    found = find_pod(UID, proc)
    assert found is not None and found.pid == 101


def test_find_pod_skips_unreadable_and_v1_only_processes(proc: Path) -> None:
    add_process(proc, "100", None)  # exited between listing and reading: no cgroup file
    add_process(proc, "101", f"/kubepods/pod{UID}/{CTR}", v1_only=True)
    assert find_pod(UID, proc) is None
    add_process(proc, "102", f"/kubepods/pod{UID}/{CTR}")
    found = find_pod(UID, proc)
    assert found is not None and found.pid == 102


def test_find_pod_ignores_non_pid_entries(proc: Path) -> None:
    add_process(proc, "self", f"/kubepods/pod{UID}/{CTR}")
    add_process(proc, "thread-self", f"/kubepods/pod{UID}/{CTR}")
    assert find_pod(UID, proc) is None


def test_find_pod_matches_the_requested_uid_only(proc: Path) -> None:
    found = find_pod(OTHER_UID, proc)
    assert found is not None
    assert found.pid == 60
    assert found.cgroup_path == MOUNT / "kubepods" / "burstable" / f"pod{OTHER_UID}"
