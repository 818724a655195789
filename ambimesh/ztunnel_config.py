"""`ambimesh ztunnel-config VIEW`: what a node's ztunnel holds, from its admin port (like
``istioctl ztunnel-config``). The views are cut from ztunnel's `/config_dump` (mesh state
as pushed by the controller, local pods, certificate expiries) and `/connections`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping

from ambimesh import output
from ambimesh.node_access import ZTUNNEL_ADMIN_PORT, CliError, Node, add_scope_flags, resolve

Item = dict[str, object]
VIEWS = ("workloads", "services", "policies", "certs", "connections")

DESCRIPTION = """\
Show what ztunnel holds on a node, read from its localhost-only admin port (:15000):
  workloads    every workload of the mesh state (pods, their addresses, node, identity)
  services     every service (VIPs, ports, endpoints, waypoint)
  policies     PeerAuthentications and AuthorizationPolicies as ztunnel enforces them
  certs        the workload certificates of this node's identities and their expiry
  connections  the connections ztunnel proxies right now
With --lab, every node of the lab (or --node N); without it, this host's ztunnel.
json and yaml print {node: [item, ...]}, the items as ztunnel reports them."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ztunnel-config",
        help="a node's ztunnel view: workloads, services, policies, certs, connections",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("view", choices=VIEWS)
    add_scope_flags(p, "only this node (default: every node of the lab, or this host)")
    output.add_output_flag(p)


def run(args: argparse.Namespace) -> int:
    try:
        scope = resolve(args)
        data = {node.name: fetch(node, args.view) for node in scope.nodes}
    except CliError as exc:
        print(f"ambimesh: {exc}", file=sys.stderr)
        return 1
    print(output.render(data, args.output, lambda: table(args.view, data, time.time())))
    return 0


def fetch(node: Node, view: str) -> list[Item]:
    """The view's items from ``node``'s ztunnel."""
    path = "/connections" if view == "connections" else "/config_dump"
    body = node.get(ZTUNNEL_ADMIN_PORT, path, "ztunnel admin")
    try:
        raw = json.loads(body)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"ztunnel on node {node.name} answered {path} with bad JSON: {exc}"
        ) from None
    return items(view, raw)


def items(view: str, raw: object) -> list[Item]:
    """Cut ``view`` out of an admin answer (`/connections` for connections, else
    `/config_dump`); a field an older ztunnel lacks reads as empty."""
    if view == "connections":
        return [dict(c) for c in _list(raw)]
    dump = raw if isinstance(raw, dict) else {}
    if view == "certs":
        certificates = dump.get("certificates")
        if not isinstance(certificates, dict):
            return []
        return [{"identity": k, "expires": v} for k, v in sorted(certificates.items())]
    if view == "policies":
        return [
            {"kind": "PeerAuthentication", **p} for p in _list(dump.get("peer_authentications"))
        ] + [
            {"kind": "AuthorizationPolicy", **p} for p in _list(dump.get("authorization_policies"))
        ]
    return [dict(i) for i in _list(dump.get(view))]


def _list(value: object) -> list[dict[str, object]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def table(view: str, data: Mapping[str, list[Item]], now: float) -> str:
    headers, row = _TABLES[view]
    rows = [
        [node, *row(item, now)]
        for node, node_items in data.items()
        # Connections stay in ztunnel's order (oldest first); certs are sorted already.
        for item in (
            node_items if view in ("connections", "certs") else sorted(node_items, key=_by_name)
        )
    ]
    return output.columns(["NODE", *headers], rows)


def _by_name(item: Item) -> tuple[str, str, str]:
    return str(item.get("kind", "")), str(item.get("namespace")), str(item.get("name"))


def _workload(w: Item, _now: float) -> list[object]:
    return [
        w.get("namespace"),
        w.get("name"),
        w.get("addresses"),
        w.get("node"),
        w.get("serviceAccount"),
        bool(w.get("ambient")),
        w.get("waypoint"),
    ]


def _service(s: Item, _now: float) -> list[object]:
    ports = [
        f"{p.get('port')}->{p.get('targetPort') or p.get('port')}" for p in _list(s.get("ports"))
    ]
    endpoints = s.get("endpointUids")
    return [
        s.get("namespace"),
        s.get("name"),
        s.get("addresses"),
        ports,
        len(endpoints) if isinstance(endpoints, list) else 0,
        s.get("waypoint"),
    ]


def _policy(p: Item, _now: float) -> list[object]:
    selector = p.get("selector")
    labels = [f"{k}={v}" for k, v in selector.items()] if isinstance(selector, dict) else []
    if p.get("kind") == "PeerAuthentication":
        ports = p.get("portModes")
        port_modes = [f"{k}:{v}" for k, v in ports.items()] if isinstance(ports, dict) else []
        what = " ".join([str(p.get("mode", "UNSET")), *port_modes])
    else:
        rules = p.get("rules")
        count = len(rules) if isinstance(rules, list) else 0
        what = f"{p.get('action', 'ALLOW')} {count} rule(s)"
    return [p.get("kind"), p.get("namespace"), p.get("name"), p.get("scope"), labels, what]


def _cert(c: Item, now: float) -> list[object]:
    return [c.get("identity"), c.get("expires"), output.time_left(c.get("expires"), now)]


def _connection(c: Item, now: float) -> list[object]:
    labels = c.get("labels")
    lab = labels if isinstance(labels, dict) else {}
    started = c.get("started")
    age = output.duration(now - started) if isinstance(started, int | float) else "?"
    return [
        c.get("direction"),
        c.get("source"),
        c.get("destination"),
        f"{lab.get('source_workload_namespace')}/{lab.get('source_workload')}",
        f"{lab.get('destination_workload_namespace')}/{lab.get('destination_workload')}",
        lab.get("connection_security_policy"),
        c.get("via"),
        age,
    ]


_TABLES: dict[str, tuple[list[str], Callable[[Item, float], list[object]]]] = {
    "workloads": (
        ["NAMESPACE", "NAME", "ADDRESSES", "ON NODE", "SERVICE ACCOUNT", "AMBIENT", "WAYPOINT"],
        _workload,
    ),
    "services": (["NAMESPACE", "NAME", "VIPS", "PORTS", "ENDPOINTS", "WAYPOINT"], _service),
    "policies": (["KIND", "NAMESPACE", "NAME", "SCOPE", "SELECTOR", "MODE / ACTION"], _policy),
    "certs": (["IDENTITY", "EXPIRES", "EXPIRES IN"], _cert),
    "connections": (
        ["DIRECTION", "SOURCE", "DESTINATION", "FROM", "TO", "SECURITY", "VIA", "AGE"],
        _connection,
    ),
}
