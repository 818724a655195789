"""Pods inside a real node (a Vagrant VM): the lab's pod builder on a host's own network.

The lab builds a whole cluster out of namespaces on one machine; here each node is a
machine of its own (``vagrant/``), so only the pods are namespaces. Everything a pod is
comes from the lab's modules, not copies of them: the plan (``topology.plan``: pod IPs,
Service VIPs, veth names, all derived from the YAML), the pod netns + veth + hosts file
(``network.build_pod``), the pod cgroup ``.../kubepods/pod<uid>`` (``cgroups``) and the
pause and container processes (``procs.spawn``), so the agent discovers them through
``/proc`` exactly as on a Kubernetes node.

The node's own (root) network namespace gets a name, ``<lab>-<node>``, with ``ip netns
attach`` (that is how ``build_pod`` finds the node end of the veth) and a bridge ``cni0``
holding the pod gateway. Pods of the other nodes are reached through those nodes'
addresses (``--node-address``), routes a CNI would install.

Pod UIDs are derived from namespace/name (unless the YAML sets ``metadata.uid``), so the
controller VM (``config``) and the node VMs (``up``) agree without talking to each other.

    python -m ambimesh.lab.podvm config --config DIR --out DIR --node-address node-1=IP,...
    python -m ambimesh.lab.podvm up --config DIR --node NODE --node-address node-1=IP,...
    python -m ambimesh.lab.podvm exec --config DIR POD -- CMD...
    python -m ambimesh.lab.podvm down --config DIR --node NODE
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import yaml
from pyroute2 import NetNS, netns

from ambimesh.lab import cgroups, network, procs
from ambimesh.lab.topology import LabPlan, NodePlan, PodPlan, documents_of, plan
from mesh.cgroups import CgroupError
from mesh.netns import Netns, write_sysctl

LAB = "vm"
# Derived pod UIDs: stable across machines and runs.
UID_NAMESPACE = uuid.UUID("6f1d2a52-7a2e-4e4c-9a55-0a6d1c5e3b10")
LOG_DIR = Path("/var/log/ambimesh")
DESCRIPTION = "Pods (netns + veth + cgroup + pause) on this node, from the lab's YAML."


class PodVmError(Exception):
    """The pods cannot be built or found; the message says why."""


def say(message: str) -> None:
    print(f"[podvm] {message}", flush=True)


def load_plan(config_dir: Path) -> LabPlan:
    files = sorted(p for p in config_dir.iterdir() if p.suffix in (".yaml", ".yml"))
    docs = documents_of((p.name, p.read_text()) for p in files)
    for doc_list in docs.values():
        for doc in doc_list:
            if doc.get("kind") == "Pod":
                meta = doc.setdefault("metadata", {})
                ref = f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"
                meta.setdefault("uid", str(uuid.uuid5(UID_NAMESPACE, ref)))
    return plan(LAB, docs, lambda: str(uuid.uuid4()))


def parse_addresses(text: str) -> dict[str, str]:
    """``node-1=192.168.56.11,node-2=...`` -> {node: address}."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, address = item.partition("=")
        if not sep:
            raise PodVmError(f"--node-address {item!r}: expected NODE=IP")
        out[name] = str(ipaddress.IPv4Address(address))
    return out


def write_config(lab_plan: LabPlan, out: Path, addresses: dict[str, str]) -> None:
    """The controller's YAML directory: the objects plus what a kubelet would report
    (pod IP, host IP = the node VM's address, UID)."""
    out.mkdir(parents=True, exist_ok=True)
    for fname, docs in lab_plan.runtime_documents.items():
        for doc in docs:
            status = doc.get("status")
            node = (doc.get("spec") or {}).get("nodeName")
            if doc.get("kind") == "Pod" and isinstance(status, dict) and node in addresses:
                status["hostIP"] = addresses[node]
        tmp = out / f".{fname}.tmp"
        tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        tmp.rename(out / fname)
    say(f"wrote {len(lab_plan.runtime_documents)} files to {out}")


def _node(lab_plan: LabPlan, name: str) -> NodePlan:
    try:
        return lab_plan.node(name)
    except KeyError:
        known = ", ".join(n.name for n in lab_plan.nodes)
        raise PodVmError(f"node {name!r} is not in the YAML (nodes: {known})") from None


def _attach_root_netns(node: NodePlan) -> None:
    """Name the netns this runs in (the VM's own) ``node.netns``: build_pod plugs into it."""
    if node.netns not in netns.listnetns():
        subprocess.run(["ip", "netns", "attach", node.netns, str(os.getpid())], check=True)


def build_node_network(lab_plan: LabPlan, node: NodePlan, addresses: dict[str, str]) -> None:
    _attach_root_netns(node)
    cidr = ipaddress.IPv4Network(node.pod_cidr)
    with NetNS(node.netns) as ns:
        if not ns.link_lookup(ifname=network.NODE_BRIDGE):
            ns.link("add", ifname=network.NODE_BRIDGE, kind="bridge")
        index = ns.link_lookup(ifname=network.NODE_BRIDGE)[0]
        have = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=index)}
        if node.gateway not in have:
            ns.addr("add", index=index, address=node.gateway, prefixlen=cidr.prefixlen)
        ns.link("set", index=index, state="up")
        for other in lab_plan.nodes:
            if other.name != node.name and other.name in addresses:
                ns.route("replace", dst=other.pod_cidr, gateway=addresses[other.name])
    with Netns.open(f"/var/run/netns/{node.netns}") as handle:
        write_sysctl(handle, "net.ipv4.ip_forward", "1")
    say(f"{node.name}: bridge {network.NODE_BRIDGE} {node.gateway}/{cidr.prefixlen}")


def start_pod(pod: PodPlan) -> None:
    cgroup = cgroups.create(cgroups.pod_cgroup(LAB, pod.node, pod.uid))
    log_file = LOG_DIR / f"pod-{pod.namespace}-{pod.name}.log"
    env = {"POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace}
    procs.spawn(["sleep", "infinity"], cgroup=cgroup, netns_name=pod.netns, pod=True, log=log_file)
    for command in pod.commands:
        procs.spawn(command, cgroup=cgroup, netns_name=pod.netns, pod=True, log=log_file, env=env)


def up(lab_plan: LabPlan, node_name: str, addresses: dict[str, str]) -> None:
    node = _node(lab_plan, node_name)
    down(lab_plan, node_name)
    build_node_network(lab_plan, node, addresses)
    for pod in (p for p in lab_plan.pods if p.node == node.name):
        network.build_pod(lab_plan, pod)
        start_pod(pod)
        say(f"pod {pod.ref} at {pod.address} (uid {pod.uid}, netns {pod.netns})")


def down(lab_plan: LabPlan, node_name: str) -> None:
    """Kill the node's pods, delete their veths and namespaces (not the node's own)."""
    node = _node(lab_plan, node_name)
    cgroups.remove_tree(cgroups.lab_root(LAB) / node.name)
    for pod in (p for p in lab_plan.pods if p.node == node.name):
        if node.netns in netns.listnetns():
            network.remove_pod(lab_plan, pod)


def exec_in_pod(lab_plan: LabPlan, ref: str, argv: Sequence[str], timeout: float) -> int:
    try:
        pod = lab_plan.pod(ref)
    except KeyError as e:
        raise PodVmError(str(e.args[0])) from None
    if pod.netns not in netns.listnetns():
        raise PodVmError(f"pod {pod.ref} is not on this node (run exec on {pod.node})")
    child = procs.spawn(
        list(argv),
        cgroup=cgroups.pod_cgroup(LAB, pod.node, pod.uid),
        netns_name=pod.netns,
        pod=True,
    )
    deadline = time.monotonic() + timeout
    while child.poll() is None:
        if time.monotonic() > deadline:
            child.kill()
            child.wait()
            raise PodVmError(f"{' '.join(argv)} in {pod.ref} took longer than {timeout}s")
        time.sleep(0.05)
    return child.returncode


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ambimesh.lab.podvm", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("config", "up", "down", "exec"):
        s = sub.add_parser(name)
        s.add_argument("--config", type=Path, required=True, help="the YAML directory")
        if name in ("config", "up"):
            s.add_argument("--node-address", default="", help="NODE=IP,... of every node")
        if name in ("up", "down"):
            s.add_argument("--node", required=True, help="this machine's node name")
        if name == "config":
            s.add_argument("--out", type=Path, required=True, help="the controller's directory")
        if name == "exec":
            s.add_argument("--timeout", type=float, default=60.0)
            s.add_argument("pod", help="namespace/name, or a unique name")
            s.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = p.parse_args(argv)
    try:
        lab_plan = load_plan(args.config)
        if args.command == "config":
            write_config(lab_plan, args.out, parse_addresses(args.node_address))
        elif args.command == "up":
            up(lab_plan, args.node, parse_addresses(args.node_address))
        elif args.command == "down":
            down(lab_plan, args.node)
        else:
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                raise PodVmError("exec needs a command after --")
            return exec_in_pod(lab_plan, args.pod, command, args.timeout)
    except (PodVmError, CgroupError, OSError, ValueError, subprocess.CalledProcessError) as e:
        print(f"podvm: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
