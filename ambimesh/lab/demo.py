"""`ambimesh lab demo`: one call across nodes through the mesh, proven three ways —
the answer, a capture of the wire between the nodes, and the metrics both ztunnels kept;
the controller's view (push streams, convergence, certificates); then the seed's 90/10
canary, counted over 200 calls through waypoint demo/waypoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ambimesh.lab.capture import fabric_capture
from ambimesh.lab.lab import CONTROLLER_METRICS_PORT, METRICS_PORT, Lab, LabError, say
from ambimesh.lab.netclient import http_get
from ambimesh.lab.topology import PodPlan

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


# The controller's samples the demo shows (of docs/metrics.md's controller section).
CONTROLLER_SHOWN = (
    "pilot_xds",
    "pilot_proxy_convergence_time_count",
    "pilot_proxy_convergence_time_sum",
    "pilot_total_xds_rejects",
    "citadel_server_success_cert_issuance_count",
    "ambimesh_controller_certificates_denied_total",
    "ambimesh_controller_config_rejects_total",
)


def controller_metrics(lab: Lab) -> dict[str, float]:
    """The controller's samples by name (labels dropped: these have at most ``type``)."""
    plan = lab.load_plan()
    _, body = http_get(
        plan.fabric_netns, plan.controller_address, CONTROLLER_METRICS_PORT, "/metrics"
    )
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


# Run in a pod: `calls` requests to `url`, one connection each; prints a JSON list of the
# answering pod of each (or the error).
SPLIT_CALLER = """
import http.client, json, sys, urllib.parse
url, calls = urllib.parse.urlsplit(sys.argv[1]), int(sys.argv[2])
seen = []
for i in range(calls):
    try:
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=10)
        conn.request("GET", f"{url.path}-{i}")
        response = conn.getresponse()
        body = response.read()
        ok = response.status == 200
        seen.append(json.loads(body)["pod"] if ok else f"HTTP {response.status}")
        conn.close()
    except Exception as exc:
        seen.append(repr(exc))
print(json.dumps(seen))
"""
CANARY_URL = "http://server/canary"
CANARY_WAYPOINT = "demo/waypoint"
CANARY_PODS = {"server", "server-v2"}


def split_calls(lab: Lab, pod_ref: str, url: str, calls: int) -> list[str]:
    """Who answered each of ``calls`` requests from ``pod_ref`` (or what went wrong)."""
    result = lab.run(pod_ref, ["python", "-c", SPLIT_CALLER, url, str(calls)], timeout=240)
    if result.returncode != 0:
        raise LabError(f"the calls from {pod_ref} did not run: {result.stderr.strip()}")
    seen: list[str] = json.loads(result.stdout)
    return seen


def waypoint_metrics(lab: Lab, pod_ref: str) -> list[str]:
    pod = lab.load_plan().pod(pod_ref)
    _, body = http_get(pod.netns, pod.address, METRICS_PORT, "/metrics")
    return [line for line in body.splitlines() if line.startswith("istio_requests_total")]


def run_canary(lab: Lab, calls: int = 200) -> int:
    """The seed's VirtualService at work: `calls` requests, counted by answering pod."""
    say(f"{CLIENT_POD} -> {CANARY_URL} x{calls} (VirtualService server: 90% v1, 10% v2)")
    seen = split_calls(lab, CLIENT_POD, CANARY_URL, calls)
    counts = {name: seen.count(name) for name in sorted(set(seen))}
    for name, count in counts.items():
        print(f"  {name}: {count}")
    say(f"metrics of waypoint {CANARY_WAYPOINT} (:{METRICS_PORT}/metrics):")
    for line in waypoint_metrics(lab, CANARY_WAYPOINT):
        print(f"  {line}")
    return 0 if set(counts) <= CANARY_PODS else 1


def run(lab: Lab) -> int:
    failed = run_l4(lab)
    if any(p.ref == CANARY_WAYPOINT for p in lab.load_plan().pods):
        failed |= run_canary(lab)
    poke_hints(lab)
    return failed


def poke_hints(lab: Lab) -> None:
    cli = Path(sys.executable).parent / "ambimesh"
    say("poke at it:")
    print(f"  {cli} lab exec client -- curl -s {URL}")
    print(f"  {cli} lab exec client -- curl -s 'http://server/x?fail=0.3&delay=0.5'  # knobs")
    print(f"  {cli} lab status   # pods, nodes, services")
    print(f"  {cli} lab down     # remove everything (make down)")
    print(f"  logs in {lab.logs}; runtime config (edit me) in {lab.config_dir}")


def answering_pod(lab: Lab, response: str) -> PodPlan:
    """The pod that answered: with the canary's routes in force it may be server-v2, on the
    other node, whose ztunnel then holds the proof."""
    plan = lab.load_plan()
    try:
        name = json.loads(response)["pod"]
    except (ValueError, KeyError, TypeError):
        return plan.pod(SERVER_POD)
    namespace = SERVER_POD.split("/")[0]
    return next(
        (p for p in plan.pods if p.namespace == namespace and p.name == name),
        plan.pod(SERVER_POD),
    )


def run_l4(lab: Lab) -> int:
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
    server = answering_pod(lab, result.stdout)
    principals = set()
    for node in plan.nodes:
        say(f"metrics of ztunnel on {node.name} (:{METRICS_PORT}/metrics):")
        for line in istio_metrics(lab, node.name):
            print(f"  {line}")
            if (
                node.name == server.node
                and 'reporter="destination"' in line
                and f'destination_workload="{server.name}"' in line
            ):
                principals.update(_PRINCIPAL.findall(line))
    say(
        f"ztunnel on {server.node} authenticated the caller of {server.ref} as: "
        + (", ".join(sorted(principals)) or "NOBODY (no mTLS connection was metered)")
    )
    if any(p.ref == CANARY_WAYPOINT for p in plan.pods):
        print(
            f"  (Service server uses waypoint {CANARY_WAYPOINT}: the call went client -> "
            "waypoint -> server, each hop over mTLS; the waypoint's metrics below name the "
            "client)"
        )
    say(f"metrics of the controller (:{CONTROLLER_METRICS_PORT}/metrics, istiod's names):")
    shown = controller_metrics(lab)
    for name in CONTROLLER_SHOWN:
        print(f"  {name} {shown.get(name, 'missing')}")
    return 1 if plaintext or wire.packets == 0 or not principals else 0
