"""`ambimesh lab demo`: one call across nodes through the mesh, proven three ways —
the answer, a capture of the wire between the nodes, and the metrics both ztunnels kept."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ambimesh.lab.capture import fabric_capture
from ambimesh.lab.lab import METRICS_PORT, Lab, say
from ambimesh.lab.netclient import http_get

CLIENT_POD = "demo/client"
SERVER_POD = "demo/server"
_PRINCIPAL = re.compile(r'source_principal="(spiffe://[^"]+)"')
URL = "http://server/hello"
FETCH = (
    "python",
    "-c",
    "import sys, urllib.request; "
    "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())",
)


def fetch_in_pod(lab: Lab, pod_ref: str, url: str) -> subprocess.CompletedProcess[str]:
    return lab.run(pod_ref, [*FETCH, url])


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
    client = plan.pod(CLIENT_POD)
    with fabric_capture(plan, client.node, pcap) as captured:
        say(f"{CLIENT_POD} (on {client.node}) -> {URL}")
        result = fetch_in_pod(lab, CLIENT_POD, URL)
    wire = captured[0]
    if result.returncode != 0:
        say(f"the call failed:\n{result.stderr}")
        return 1
    print(f"  response: {result.stdout.strip()}")
    plaintext = wire.contains(b"GET /hello")
    say(
        f"capture between {client.node} and the fabric ({pcap}): {wire.packets} packets, "
        f"TCP ports {sorted(wire.ports())}: "
        + ("PLAINTEXT FOUND" if plaintext else "no plaintext of the request (mTLS to :15008)")
    )
    server = plan.pod(SERVER_POD)
    principals = set()
    for node in plan.nodes:
        say(f"metrics of ztunnel on {node.name} (:{METRICS_PORT}/metrics):")
        for line in istio_metrics(lab, node.name):
            print(f"  {line}")
            if node.name == server.node and 'reporter="destination"' in line:
                principals.update(_PRINCIPAL.findall(line))
    say(
        f"ztunnel on {server.node} authenticated the caller of {SERVER_POD} as: "
        + (", ".join(sorted(principals)) or "NOBODY (no mTLS connection was metered)")
    )
    cli = Path(sys.executable).parent / "ambimesh"
    say("poke at it:")
    print(f"  {cli} lab exec client -- curl -s {URL}")
    print(f"  {cli} lab status   # pods, nodes, services")
    print(f"  {cli} lab down     # remove everything (make down)")
    print(f"  logs in {lab.logs}; runtime config (edit me) in {lab.config_dir}")
    return 1 if plaintext or wire.packets == 0 or not principals else 0
