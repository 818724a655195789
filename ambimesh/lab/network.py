"""Builds and removes the lab's network namespaces, veths and bridges through netlink.

Everything lives inside namespaces the lab creates; nothing is added to the host's own
namespace, so the lab's addresses can never leak onto a real network.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
from pathlib import Path

from pyroute2 import NetNS, netns

from ambimesh.lab.topology import FABRIC_NET, LabPlan, NodePlan, PodPlan
from mesh.netns import Netns, write_sysctl

log = logging.getLogger(__name__)

NETNS_ETC = Path("/etc/netns")
FABRIC_BRIDGE = "fabric0"
NODE_BRIDGE = "cni0"


def _ifindex(ns: NetNS, name: str) -> int:
    found = ns.link_lookup(ifname=name)
    if not found:
        raise RuntimeError(f"interface {name} did not appear")
    return int(found[0])


def _up(ns: NetNS, name: str) -> None:
    ns.link("set", index=_ifindex(ns, name), state="up")


def _sysctl(netns_name: str, key: str, value: str) -> None:
    """Write a per-namespace sysctl: /proc/sys/net reflects the opening thread's netns."""
    with Netns.open(f"/var/run/netns/{netns_name}") as ns:
        write_sysctl(ns, key, value)


def _create_netns(name: str) -> None:
    if name in netns.listnetns():
        netns.remove(name)
    netns.create(name)
    with NetNS(name) as ns:
        _up(ns, "lo")


def _plug(bridge_netns: str, bridge: str, port: str, peer_netns: str) -> None:
    """A veth from ``bridge`` (port ``port``) to ``eth0`` in ``peer_netns``, like a cable."""
    with NetNS(bridge_netns) as ns:
        ns.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": peer_netns})
        ns.link("set", index=_ifindex(ns, port), master=_ifindex(ns, bridge), state="up")


def build_fabric(plan: LabPlan) -> None:
    log.info(
        "netns %s: fabric bridge %s, controller %s",
        plan.fabric_netns,
        FABRIC_BRIDGE,
        plan.controller_address,
    )
    _create_netns(plan.fabric_netns)
    with NetNS(plan.fabric_netns) as ns:
        ns.link("add", ifname=FABRIC_BRIDGE, kind="bridge")
        ns.addr(
            "add",
            index=_ifindex(ns, FABRIC_BRIDGE),
            address=plan.controller_address,
            prefixlen=FABRIC_NET.prefixlen,
        )
        _up(ns, FABRIC_BRIDGE)


def build_node(plan: LabPlan, node: NodePlan) -> None:
    log.info("netns %s: %s on the fabric, pods in %s", node.netns, node.address, node.pod_cidr)
    _create_netns(node.netns)
    _plug(plan.fabric_netns, FABRIC_BRIDGE, node.fabric_veth, node.netns)
    cidr = ipaddress.IPv4Network(node.pod_cidr)
    with NetNS(node.netns) as ns:
        ns.addr(
            "add", index=_ifindex(ns, "eth0"), address=node.address, prefixlen=FABRIC_NET.prefixlen
        )
        _up(ns, "eth0")
        ns.link("add", ifname=NODE_BRIDGE, kind="bridge")
        ns.addr(
            "add", index=_ifindex(ns, NODE_BRIDGE), address=node.gateway, prefixlen=cidr.prefixlen
        )
        _up(ns, NODE_BRIDGE)
        for other in plan.nodes:
            if other.name != node.name:
                ns.route("add", dst=other.pod_cidr, gateway=other.address)
    with NetNS(plan.fabric_netns) as fabric:
        fabric.route("add", dst=node.pod_cidr, gateway=node.address)
    _sysctl(node.netns, "net.ipv4.ip_forward", "1")


def build_pod(plan: LabPlan, pod: PodPlan) -> None:
    node = plan.node(pod.node)
    log.info("netns %s: pod %s at %s behind %s", pod.netns, pod.ref, pod.address, node.name)
    _create_netns(pod.netns)
    _plug(node.netns, NODE_BRIDGE, pod.host_veth, pod.netns)
    prefix = ipaddress.IPv4Network(node.pod_cidr).prefixlen
    with NetNS(pod.netns) as ns:
        ns.addr("add", index=_ifindex(ns, "eth0"), address=pod.address, prefixlen=prefix)
        _up(ns, "eth0")
        ns.route("add", dst="0.0.0.0/0", gateway=node.gateway)
    etc = NETNS_ETC / pod.netns
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(plan.hosts_file(pod))


def remove_pod(plan: LabPlan, pod: PodPlan) -> None:
    """What a CNI DEL does: delete the pod's veth, then its namespace.

    The veth goes explicitly: a namespace lives on while anyone (ztunnel, the agent) still
    holds an fd on it, and with it the veth and its name on the node's bridge.
    """
    with NetNS(plan.node(pod.node).netns) as ns:
        found = ns.link_lookup(ifname=pod.host_veth)
        if found:
            ns.link("del", index=found[0])
    if pod.netns in netns.listnetns():
        netns.remove(pod.netns)
    shutil.rmtree(NETNS_ETC / pod.netns, ignore_errors=True)


def remove_namespaces(prefix: str) -> list[str]:
    """Delete every netns (and its /etc/netns dir) whose name starts with ``prefix``-.

    Deleting a namespace destroys its veths (and their peers) and BPF links with it.
    """
    removed = []
    for name in netns.listnetns():
        if name.startswith(f"{prefix}-"):
            netns.remove(name)
            removed.append(name)
    if NETNS_ETC.is_dir():
        for path in NETNS_ETC.iterdir():
            if path.name.startswith(f"{prefix}-"):
                shutil.rmtree(path, ignore_errors=True)
    return removed
