"""Child process of test_node_capabilities.py: the node components' kernel calls, each
tried once, under whatever capabilities the parent left it; prints JSON {call: error}.

``agent CGROUP NETNS PIN_DIR PID``: what the agent does (maps, programs, pins, cgroup
attach, sk_lookup link, SOCKHASH update, query, ``/proc/PID/ns/net`` of another user).
``ztunnel NETNS``: setns into a pod netns and its sysctl, as ztunnel's in-pod sockets do.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable

from bpf.loader import MeshBpf
from bpf.sweep import cgroup_programs

ADDRESS = "198.18.77.2"


def _try(results: dict[str, str | None], name: str, call: Callable[[], object]) -> bool:
    try:
        call()
    except Exception as exc:
        results[name] = f"{type(exc).__name__}: {exc}"[:200]
        return False
    results[name] = None
    return True


def agent(cgroup: str, netns: str, pin_dir: str, pid: str) -> dict[str, str | None]:
    results: dict[str, str | None] = {}
    _try(results, "open /proc/PID/ns/net", lambda: os.close(os.open(f"/proc/{pid}/ns/net", 0)))
    box: list[MeshBpf] = []
    if not _try(results, "load and pin", lambda: box.append(MeshBpf(pin_dir=pin_dir))):
        return results
    mesh = box[0]
    listener = socket.create_server(("127.0.0.1", 0))
    netns_fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY)
    try:
        _try(
            results,
            "sockhash update",
            lambda: mesh.set_inbound_listener(ADDRESS, listener.fileno()),
        )
        _try(results, "attach pod", lambda: mesh.attach_pod(cgroup, netns_fd, [ADDRESS], "p"))
        _try(results, "attach proxy", lambda: mesh.attach_proxy(cgroup))
        _try(results, "query programs by id", lambda: cgroup_programs(cgroup))
        _try(results, "close", mesh.close)
    finally:
        os.close(netns_fd)
        listener.close()
    return results


def ztunnel(netns: str) -> dict[str, str | None]:
    from pyroute2.netns import setns

    results: dict[str, str | None] = {}
    if _try(results, "setns", lambda: setns(f"/var/run/netns/{netns}")):
        with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as sysctl:
            _try(results, "netns sysctl", lambda: sysctl.write("1"))
    return results


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    print(json.dumps(agent(*args) if role == "agent" else ztunnel(*args)))
