"""`ambimesh status`: is the mesh healthy, node by node.

Each node is asked on its own loopback (ambimesh/node_access.py): ztunnel's admin
`/config_dump` gives the pods it serves and each identity's certificate expiry; the
agent's metrics (:15014) give the pods it captured, the ones still pending, and the eBPF
programs and links the kernel reports attached (the agent queries the kernel for each,
`ambimesh_bpf_programs_attached`). The controller is checked with a TLS handshake.
Everything found wrong is listed under "problems" with what to do; any problem: exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ambimesh import output
from ambimesh.lab.lab import AGENT_METRICS_PORT
from ambimesh.node_access import (
    ZTUNNEL_ADMIN_PORT,
    CliError,
    Node,
    Scope,
    add_controller_flags,
    add_scope_flags,
    resolve,
)

Status = dict[str, Any]

AGENT_GAUGES = {
    "ambimesh_enrolled_pods": "enrolled_pods",
    "ambimesh_pending_pods": "pending_pods",
    "ambimesh_bpf_programs_attached": "bpf_programs_attached",
    "ambimesh_config_synced": "config_synced",
    "ambimesh_ztunnel_connected": "ztunnel_connected",
}

DESCRIPTION = """\
Check the mesh: the controller answers (TLS with the mesh root), and for each node its
ztunnel and agent answer, the pods enrolled there (captured by the agent, served by
ztunnel), the eBPF programs attached, and each identity's certificate expiry.
With --lab, every node of that lab; without it, this host's node.
Exit status: 1 if anything is wrong (each listed under problems), 0 otherwise."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="controller, nodes, enrolled pods, BPF programs, certificate expiries",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_scope_flags(p, "only this node (default: every node of the lab, or this host)")
    add_controller_flags(p)
    output.add_output_flag(p)


def run(args: argparse.Namespace) -> int:
    try:
        if args.lab is not None and args.controller:
            raise CliError("--controller is for this host's node; a lab knows its controller")
        scope = resolve(args)
    except CliError as exc:
        print(f"ambimesh: {exc}", file=sys.stderr)
        return 1
    now = time.time()
    status = collect(scope, now)
    print(output.render(status, args.output, lambda: table(status, now)))
    for problem in status["problems"]:
        print(f"ambimesh: {problem}", file=sys.stderr)
    return 1 if status["problems"] else 0


def collect(scope: Scope, now: float) -> Status:
    reachable, detail = scope.controller.check()
    controller = {"address": scope.controller.target, "reachable": reachable, "detail": detail}
    nodes = [node_status(node) for node in scope.nodes]
    status: Status = {"lab": scope.lab, "controller": controller, "nodes": nodes}
    status["problems"] = problems(status, now)
    return status


def node_status(node: Node) -> Status:
    """What one node's ztunnel and agent say; an unreachable one's error instead."""
    status: Status = {"name": node.name}
    try:
        dump = json.loads(node.get(ZTUNNEL_ADMIN_PORT, "/config_dump", "ztunnel admin"))
        status["ztunnel"] = {"reachable": True, "error": None}
        status.update(ztunnel_view(dump))
    except (CliError, json.JSONDecodeError) as exc:
        status["ztunnel"] = {"reachable": False, "error": str(exc)}
        status.update({"pods": [], "certificates": []})
    try:
        metrics = node.get(AGENT_METRICS_PORT, "/metrics", "agent metrics")
        status["agent"] = {"reachable": True, "error": None, **agent_view(metrics)}
    except (CliError, ValueError) as exc:
        status["agent"] = {"reachable": False, "error": str(exc)}
    return status


def ztunnel_view(dump: Mapping[str, Any]) -> Status:
    """The pods ztunnel serves and its certificates, from its `/config_dump`."""
    pods = [
        {
            "pod": p.get("pod"),
            "addresses": list(p.get("addresses") or []),
            "identity": p.get("identity"),
            "hbone_serving": bool(p.get("hbone_serving")),
        }
        for p in dump.get("local_pods") or []
    ]
    certs = dump.get("certificates") or {}
    return {
        "pods": sorted(pods, key=lambda p: str(p["pod"])),
        "certificates": [{"identity": k, "expires": v} for k, v in sorted(certs.items())],
    }


def agent_view(metrics_text: str) -> Status:
    """The agent's health gauges (AGENT_GAUGES) from its Prometheus text; absent ones are
    None (an older agent). Raises ValueError on text that is not Prometheus'."""
    values: Status = dict.fromkeys(AGENT_GAUGES.values())
    for family in text_string_to_metric_families(metrics_text):
        key = AGENT_GAUGES.get(family.name)
        if key is not None and family.samples:
            value = family.samples[0].value
            synced = key in ("config_synced", "ztunnel_connected")
            values[key] = bool(value) if synced else int(value)
    return values


def problems(status: Status, now: float) -> list[str]:
    """Everything wrong, each with what to look at next."""
    found = []
    controller = status["controller"]
    if not controller["reachable"]:
        where = f"controller {controller['address']}: " if controller["address"] else ""
        found.append(f"{where}{controller['detail']}")
    for node in status["nodes"]:
        name = node["name"]
        for part in ("ztunnel", "agent"):
            if not node[part]["reachable"]:
                found.append(node[part]["error"])
        agent = node["agent"]
        if agent["reachable"]:
            if agent["pending_pods"]:
                found.append(
                    f"node {name}: {agent['pending_pods']} pod(s) enrolled by the controller "
                    "are not captured yet (see the agent's log)"
                )
            if agent["config_synced"] is False:
                found.append(f"node {name}: the agent has no configuration from the controller")
            if agent["ztunnel_connected"] is False:
                found.append(f"node {name}: ztunnel is not connected to the agent")
        for pod in node["pods"]:
            if not pod["hbone_serving"]:
                found.append(f"node {name}: ztunnel does not serve HBONE for pod {pod['pod']} yet")
        for cert in node["certificates"]:
            left = output.seconds_until(cert["expires"], now)
            if left is None or left <= 0:
                found.append(
                    f"node {name}: the certificate of {cert['identity']} expired "
                    f"({cert['expires']}): is the controller reachable from the node?"
                )
    return found


def table(status: Status, now: float) -> str:
    controller = status["controller"]
    lines = [
        f"controller  {controller['address'] or '?'}  "
        f"{'reachable' if controller['reachable'] else 'NOT reachable'}: {controller['detail']}",
        "",
    ]
    nodes = status["nodes"]
    lines.append(
        output.columns(
            ["NODE", "ZTUNNEL", "AGENT", "ENROLLED PODS", "PENDING", "BPF PROGRAMS", "CERTS"],
            [
                [
                    n["name"],
                    "up" if n["ztunnel"]["reachable"] else "DOWN",
                    "up" if n["agent"]["reachable"] else "DOWN",
                    n["agent"].get("enrolled_pods"),
                    n["agent"].get("pending_pods"),
                    n["agent"].get("bpf_programs_attached"),
                    len(n["certificates"]),
                ]
                for n in nodes
            ],
        )
    )
    pods = [
        [n["name"], p["pod"], p["addresses"], p["identity"], p["hbone_serving"]]
        for n in nodes
        for p in n["pods"]
    ]
    if pods:
        lines += ["", output.columns(["NODE", "POD", "ADDRESSES", "IDENTITY", "HBONE"], pods)]
    certs = [
        [n["name"], c["identity"], c["expires"], output.time_left(c["expires"], now)]
        for n in nodes
        for c in n["certificates"]
    ]
    if certs:
        lines += ["", output.columns(["NODE", "IDENTITY", "EXPIRES", "EXPIRES IN"], certs)]
    lines += ["", f"{len(status['problems'])} problem(s)"]
    return "\n".join(lines)
