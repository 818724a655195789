"""`ambimesh lab demo`: one call across nodes through the mesh, proven three ways —
the answer, a capture of the wire between the nodes, and the metrics both ztunnels kept."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from ambimesh.lab import cgroups, procs
from ambimesh.lab.lab import METRICS_PORT, Lab, say
from ambimesh.lab.netclient import http_get
from ambimesh.lab.network import FABRIC_BRIDGE

CLIENT_POD = "demo/client"
URL = "http://server/hello"
FETCH = (
    "python",
    "-c",
    "import sys, urllib.request; "
    "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())",
)


def capture(lab: Lab, pcap: Path) -> subprocess.Popen[bytes]:
    """tcpdump on the fabric bridge: the only wire between the nodes."""
    plan = lab.load_plan()
    return subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            plan.fabric_netns,
            "tcpdump",
            "-i",
            FABRIC_BRIDGE,
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
            str(pcap),
            "tcp",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def fetch_in_pod(lab: Lab, pod_ref: str, url: str) -> subprocess.CompletedProcess[str]:
    plan = lab.load_plan()
    pod = plan.pod(pod_ref)
    proc = procs.spawn(
        [*FETCH, url],
        cgroup=cgroups.pod_cgroup(lab.name, pod.node, pod.uid),
        netns_name=pod.netns,
        pod=True,
        log=None,
        capture=True,
    )
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def istio_metrics(lab: Lab, node: str) -> list[str]:
    plan = lab.load_plan()
    n = plan.node(node)
    _, body = http_get(n.netns, n.address, METRICS_PORT, "/metrics")
    return [
        line
        for line in body.splitlines()
        if line.startswith("istio_tcp_") and not line.startswith("#")
    ]


def run(lab: Lab) -> int:
    plan = lab.load_plan()
    pcap = lab.state / "fabric.pcap"
    sniffer = capture(lab, pcap)
    time.sleep(1.0)
    say(f"{CLIENT_POD} (on {plan.pod(CLIENT_POD).node}) -> {URL}")
    result = fetch_in_pod(lab, CLIENT_POD, URL)
    time.sleep(0.5)
    sniffer.terminate()
    sniffer.wait(5)
    if result.returncode != 0:
        say(f"the call failed:\n{result.stderr}")
        return 1
    print(f"  response: {result.stdout.strip()}")
    wire = pcap.read_bytes() if pcap.exists() else b""
    plaintext = b"GET /hello" in wire
    say(
        f"capture on the fabric ({len(wire)} bytes in {pcap}): "
        + ("PLAINTEXT FOUND" if plaintext else "no plaintext of the request; TLS records to :15008")
    )
    for node in plan.nodes:
        say(f"metrics of ztunnel on {node.name} (:{METRICS_PORT}/metrics):")
        for line in istio_metrics(lab, node.name):
            print(f"  {line}")
    say("poke at it:")
    print(f"  ambimesh lab exec client -- curl -s {URL}")
    print("  ambimesh lab status        # pods, nodes, services")
    print(f"  logs in {lab.logs}; runtime config (edit me) in {lab.config_dir}")
    print("  ambimesh lab down          # remove everything")
    return 1 if plaintext else 0
