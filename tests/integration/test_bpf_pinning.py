"""Pinned maps and links: capture outlives the agent, and the next agent takes over.

Same lab as test_bpf_datapath.py. Each test gets its own pin dir on bpffs. "The agent
dies" is ``MeshBpf.release()``: every fd it held is closed, as the kernel would on exit,
and only the pins, the legacy cgroup attachments and the test's sockets (ztunnel's)
remain.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from pyroute2 import NetNS, netns

from bpf.loader import (
    DEFAULT_BPFFS,
    BpfError,
    MeshBpf,
    _Libbpf,
    _LinkInfo,
    ensure_bpffs,
    purge_pins,
)
from bpf.sweep import CGROUP_ATTACH_TYPES
from mesh.netns import Netns
from tests.integration.privileged import require_privileged
from tests.integration.test_bpf_datapath import (
    PEER,
    POD_A,
    REMOTE,
    TIMEOUT,
    Lab,
    Pod,
    accept,
    build_lab,
    nothing_pending,
    original_dst,
)

pytestmark = pytest.mark.privileged

POD_KEY = "pod-a"
# From include/uapi/linux/bpf.h.
_MAP_HASH = 1
_MAP_LRU_HASH = 9
_LINK_TYPE_NETNS = 5
_ATTACH_CGROUP_GETSOCKOPT = 21
_ATTACH_SK_LOOKUP = 36
_MNT_DETACH = 2


@pytest.fixture
def lab() -> Iterator[Lab]:
    with build_lab() as built:
        yield built


@pytest.fixture
def pin_dir() -> Iterator[str]:
    require_privileged()
    ensure_bpffs()
    path = f"{DEFAULT_BPFFS}/ambimesh-test-{secrets.token_hex(6)}"
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _libbpf() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_link_get_next_id.argtypes = [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    lib.bpf_link_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_map_create.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_uint32,
        ctypes.c_void_p,
    ]
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    return lib


def all_links() -> list[_LinkInfo]:
    """Every BPF link on the host (bpftool is not installed), by walking the link IDs."""
    lib, info = _libbpf(), _Libbpf()
    links = []
    link_id = ctypes.c_uint32(0)
    while lib.bpf_link_get_next_id(link_id.value, ctypes.byref(link_id)) == 0:
        fd = lib.bpf_link_get_fd_by_id(link_id.value)
        if fd < 0:
            continue  # freed meanwhile
        try:
            links.append(info.link_info(fd))
        finally:
            os.close(fd)
    return links


def sk_lookup_links(netns_fd: int) -> list[_LinkInfo]:
    ino = os.fstat(netns_fd).st_ino
    return [
        link
        for link in all_links()
        if (link.type, link.attach_type, link.netns_ino)
        == (_LINK_TYPE_NETNS, _ATTACH_SK_LOOKUP, ino)
    ]


def pinned_link(path: str) -> _LinkInfo:
    info = _Libbpf()
    fd = info.obj_get(path)
    try:
        return info.link_info(fd)
    finally:
        os.close(fd)


def cgroup_programs(cgroup_path: str, attach_type: int) -> list[int]:
    fd = os.open(cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _Libbpf().prog_query(fd, attach_type)
    finally:
        os.close(fd)


def bpf_fds() -> int:
    """How many BPF maps, programs and links this process holds fds of."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:bpf")
    return count


def eventually(check: Callable[[], bool]) -> bool:
    """Kernel objects are freed asynchronously: poll ``check`` up to TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def enroll(lab: Lab, mesh: MeshBpf, pin_key: str = POD_KEY) -> Pod:
    """test_bpf_datapath's enroll for pod "a", with its link pinned."""
    outbound = lab.listener("a", ("127.0.0.1", 15001), cgroup="proxy")
    inbound = lab.listener("a", ("0.0.0.0", 15006), cgroup="proxy")
    mesh.set_inbound_listener(POD_A, inbound.fileno())
    attachment = mesh.attach_pod(
        lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A], pin_key=pin_key
    )
    return Pod(attachment, outbound, inbound)


def assert_steered(lab: Lab, inbound: socket.socket, client_ns: str = "peer") -> None:
    """A connection to the pod's app port lands on ztunnel's inbound listener."""
    bind = (POD_A, 0) if client_ns == "a" else None
    client = lab.client(client_ns, bind=bind)
    client.connect((POD_A, 8080))
    with accept(inbound) as conn:
        assert conn.getsockname() == (POD_A, 8080)


def recreate_netns(lab: Lab, role: str) -> None:
    """Delete the pod's netns and make a new one with the same name and pod IP."""
    name = f"{lab.tag}-{role}"
    lab.namespaces.pop(role).close()
    netns.remove(name)
    netns.create(name)
    lab.namespaces[role] = Netns.open(f"/var/run/netns/{name}")
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        ns.link("add", ifname="pod0", kind="veth", peer="pod1")  # no dummy driver here
        index = ns.link_lookup(ifname="pod0")[0]
        ns.addr("add", index=index, address=POD_A, prefixlen=24)
        ns.link("set", index=index, state="up")


def test_released_agent_leaves_inbound_captured_and_failing_closed(lab: Lab, pin_dir: str) -> None:
    before = bpf_fds()
    with MeshBpf(pin_dir=pin_dir) as agent:
        pod = enroll(lab, agent)
        agent.release()
    assert bpf_fds() == before  # only the pins keep the link and the maps now
    app = lab.listener("a", ("0.0.0.0", 8080))

    assert_steered(lab, pod.inbound)
    pod.inbound.close()  # ztunnel is gone too: no plaintext to the app
    outside = lab.client("peer")
    outside.settimeout(0.5)
    with pytest.raises(OSError):
        outside.connect((POD_A, 8080))
    assert nothing_pending(app)
    with MeshBpf(pin_dir=pin_dir) as reader:
        counts = reader.counters()
    assert counts["inbound_steered"] == 1
    assert counts["inbound_dropped"] >= 1


def test_next_agent_adopts_the_pinned_link_and_shares_the_maps(lab: Lab, pin_dir: str) -> None:
    with MeshBpf(pin_dir=pin_dir) as old:
        pod = enroll(lab, old)
        assert_steered(lab, pod.inbound)
        (old_link,) = sk_lookup_links(lab.namespaces["a"].fileno())
        old.release()
    pod.inbound.close()  # ztunnel restarts as well, with a new listener

    with MeshBpf(pin_dir=pin_dir) as new:
        assert new.pinned_pods() == {POD_KEY}
        assert new.counters()["inbound_steered"] == 1
        inbound = lab.listener("a", ("0.0.0.0", 15006), cgroup="proxy")
        new.set_inbound_listener(POD_A, inbound.fileno())
        new.attach_pod(lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A], pin_key=POD_KEY)
        (link,) = sk_lookup_links(lab.namespaces["a"].fileno())
        assert link.id == old_link.id, "adopted, not a second link"
        assert link.prog_id != old_link.prog_id, "switched to the new agent's program"
        assert pinned_link(f"{pin_dir}/links/{POD_KEY}").id == link.id
        assert_steered(lab, inbound)
        assert new.counters()["inbound_steered"] == 2
    # close() stops capture: the adopted link is detached and unpinned.
    assert eventually(lambda: sk_lookup_links(lab.namespaces["a"].fileno()) == [])
    assert os.listdir(f"{pin_dir}/links") == []


def test_stale_pin_of_a_replaced_netns_is_replaced(lab: Lab, pin_dir: str) -> None:
    with MeshBpf(pin_dir=pin_dir) as old:
        pod = enroll(lab, old)
        (old_link,) = sk_lookup_links(lab.namespaces["a"].fileno())
        old.release()
    pod.inbound.close()
    pod.outbound.close()
    old_ino = os.fstat(lab.namespaces["a"].fileno()).st_ino
    recreate_netns(lab, "a")
    assert os.fstat(lab.namespaces["a"].fileno()).st_ino != old_ino

    with MeshBpf(pin_dir=pin_dir) as new:
        assert new.pinned_pods() == {POD_KEY}
        inbound = lab.listener("a", ("0.0.0.0", 15006), cgroup="proxy")
        new.set_inbound_listener(POD_A, inbound.fileno())
        new.attach_pod(lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A], pin_key=POD_KEY)
        (link,) = sk_lookup_links(lab.namespaces["a"].fileno())
        assert link.id != old_link.id
        assert pinned_link(f"{pin_dir}/links/{POD_KEY}").id == link.id
        assert eventually(lambda: old_link.id not in {other.id for other in all_links()})
        lab.listener("a", ("0.0.0.0", 8080))
        assert_steered(lab, inbound, client_ns="a")


def test_outbound_survives_the_agent_and_the_next_one_answers_original_dst(
    lab: Lab, pin_dir: str
) -> None:
    with MeshBpf(pin_dir=pin_dir) as old:
        old.attach_proxy(lab.cgroups["proxy"])
        pod = enroll(lab, old)
        old_getsockopt = cgroup_programs(lab.cgroups["proxy"], _ATTACH_CGROUP_GETSOCKOPT)
        old.release()
    # Only the released agent's programs are attached when the pod connects.
    app = lab.client("a", cgroup="a")
    app.connect(REMOTE)
    assert app.getpeername() == REMOTE

    with MeshBpf(pin_dir=pin_dir) as new:
        new.attach_proxy(lab.cgroups["proxy"])
        getsockopt = cgroup_programs(lab.cgroups["proxy"], _ATTACH_CGROUP_GETSOCKOPT)
        assert len(getsockopt) == 1
        assert not set(getsockopt) & set(old_getsockopt), "the new agent's program answers"
        with accept(pod.outbound) as conn:
            assert original_dst(conn) == REMOTE
        counts = new.counters()
    assert counts["outbound_redirected"] == 1
    assert counts["outbound_established"] == 1
    assert counts["original_dst_answered"] == 1


@pytest.mark.parametrize(
    ("map_type", "key_size", "max_entries"),
    [(_MAP_HASH, 8, 4096), (_MAP_LRU_HASH, 4, 4096), (_MAP_HASH, 4, 64)],
    ids=["key-size", "type", "max-entries"],
)
def test_incompatible_pinned_map_is_refused(
    pin_dir: str, map_type: int, key_size: int, max_entries: int
) -> None:
    """enrolled_pods is a hash of u32 -> u8 with 4096 entries; bcc alone would reuse these."""
    lib = _libbpf()
    os.makedirs(f"{pin_dir}/maps")
    fd = lib.bpf_map_create(map_type, b"enrolled_pods", key_size, 1, max_entries, None)
    assert fd >= 0, os.strerror(-fd)
    try:
        assert lib.bpf_obj_pin(fd, f"{pin_dir}/maps/enrolled_pods".encode()) == 0
    finally:
        os.close(fd)
    before = bpf_fds()
    with pytest.raises(BpfError, match=f"Remove the pin dir {re.escape(pin_dir)}"):
        MeshBpf(pin_dir=pin_dir)
    assert bpf_fds() == before


def test_detach_unpin_and_purge_remove_the_pins(lab: Lab, pin_dir: str) -> None:
    with MeshBpf(pin_dir=pin_dir) as old:
        pod = enroll(lab, old)
        old.detach_pod(pod.attachment)
        assert old.pinned_pods() == set()
        assert eventually(lambda: sk_lookup_links(lab.namespaces["a"].fileno()) == [])
        old.attach_pod(lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A], pin_key=POD_KEY)
        old.release()

    with MeshBpf(pin_dir=pin_dir) as new:
        # The pod is no longer wanted after the restart.
        assert new.pinned_pods() == {POD_KEY}
        new.unpin_pod(POD_KEY, addresses=[POD_A], cgroup_path=lab.cgroups["a"])
        new.unpin_pod(POD_KEY)  # idempotent
        assert new.pinned_pods() == set()
        assert len(new.table("enrolled_pods")) == 0
    assert eventually(lambda: sk_lookup_links(lab.namespaces["a"].fileno()) == [])
    assert all(cgroup_programs(lab.cgroups["a"], t) == [] for t in CGROUP_ATTACH_TYPES)

    # Neither direction is captured any more.
    remote = lab.listener("peer", (PEER, 80))
    app = lab.client("a", cgroup="a")
    app.connect((PEER, 80))
    with accept(remote) as conn:
        assert conn.getpeername() == app.getsockname()
    server = lab.listener("a", ("0.0.0.0", 8080))
    outside = lab.client("peer")
    outside.connect((POD_A, 8080))
    with accept(server) as conn:
        assert conn.getsockname() == (POD_A, 8080)
    assert nothing_pending(pod.outbound)

    purge_pins(pin_dir)
    assert not os.path.exists(pin_dir)
    purge_pins(pin_dir)  # idempotent


def test_pinning_misuse_is_refused(lab: Lab, pin_dir: str, tmp_path: os.PathLike[str]) -> None:
    with MeshBpf() as unpinned:
        with pytest.raises(BpfError, match="pin_dir"):
            unpinned.attach_pod(
                lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A], pin_key=POD_KEY
            )
        with pytest.raises(BpfError, match="pin_dir"):
            unpinned.pinned_pods()
    with MeshBpf(pin_dir=pin_dir) as pinned:
        for bad in ("", "a.b", "..", "a/b"):
            with pytest.raises(BpfError, match="pin key"):
                pinned.attach_pod(
                    lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A], pin_key=bad
                )
        pinned.attach_pod(lab.cgroups["a"], lab.namespaces["a"].fileno(), [POD_A], pin_key=POD_KEY)
        with pytest.raises(BpfError, match="already used"):
            pinned.attach_pod(lab.cgroups["b"], lab.namespaces["b"].fileno(), [], pin_key=POD_KEY)
    with pytest.raises(BpfError, match="not on a bpf filesystem"):
        MeshBpf(pin_dir=os.fspath(tmp_path))
    with pytest.raises(BpfError, match="not a directory inside a bpf filesystem"):
        purge_pins(os.fspath(tmp_path))
    assert os.path.isdir(tmp_path)


def test_ensure_bpffs_mounts_once(tmp_path: os.PathLike[str]) -> None:
    require_privileged()
    target = os.fspath(tmp_path)

    def mounts() -> int:
        with open("/proc/mounts", encoding="utf-8") as table:
            return sum(line.split()[1:3] == [target, "bpf"] for line in table)

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        ensure_bpffs(target)
        ensure_bpffs(target)
        assert mounts() == 1
    finally:
        for _ in range(3):  # one per mount, should a broken ensure_bpffs stack them
            if mounts():
                libc.umount2(target.encode(), _MNT_DETACH)


class RefusedFastPath(MeshBpf):
    """fastpath.c with a read through an integer that every verifier refuses: the kernel
    turns the fast path's program down as 6.1 turned down an earlier one."""

    @staticmethod
    def source() -> str:
        entry = "int ambimesh_fastpath(struct sk_msg_md *msg)\n{\n"
        text = MeshBpf.source()
        assert entry in text
        refused = "    if (msg->size == 7)\n        return *(int *)(long)msg->size;\n"
        return text.replace(entry, entry + refused)


def test_a_refused_fast_path_leaves_capture_running_and_ztunnel_without_it(
    lab: Lab, pin_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "bpf.loader")
    with RefusedFastPath(pin_dir=pin_dir) as agent:
        assert agent.fast_path is False
        assert "same-node fast path off: the kernel refused ambimesh_fastpath" in caplog.text
        # ztunnel opens the fast path through this pin: gone, so it relays in user space.
        assert not os.path.exists(f"{pin_dir}/maps/fastpath_socks")
        assert os.path.exists(f"{pin_dir}/maps/counters")
        pod = enroll(lab, agent)
        assert_steered(lab, pod.inbound)
    with MeshBpf(pin_dir=pin_dir) as fixed:
        assert fixed.fast_path is True
        assert os.path.exists(f"{pin_dir}/maps/fastpath_socks")
