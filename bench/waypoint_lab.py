"""The waypoint benchmark's lab: one client, one nginx, and the same Service three times.

Pods (namespace ``wpb``, enrolled, STRICT): ``client`` on node-1, ``server`` on node-2
(nginx, 1 worker, 1 KiB answers), and two waypoint pods on node-2 — ``waypoint`` runs
ambimesh's waypoint, ``envoy-waypoint`` gets Envoy in its place (bench/envoy_waypoint.py).
Three Services select the one server pod and differ only in their waypoint:

- ``web-l4``: none, the L4 baseline: client ztunnel -> HBONE -> server ztunnel -> nginx;
- ``web``: ``waypoint``: client ztunnel -> HBONE -> ambimesh waypoint -> HBONE -> server
  ztunnel -> nginx, routed by a VirtualService made from :data:`ROUTES`;
- ``web-envoy``: ``envoy-waypoint``, the same hops with Envoy as the waypoint, routed by
  the same :data:`ROUTES`.

So both waypoints sit between the same two ztunnels, in the same kind of pod on the same
node, and only the waypoint process differs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ambimesh.lab import cgroups
from ambimesh.lab.lab import LabError, bundled_config_dir
from ambimesh.lab.topology import CLUSTER_DOMAIN, WAYPOINT_LABEL, PodPlan
from bench import certs, envoy, envoy_waypoint
from bench.envoy_waypoint import Route
from bench.sampling import Proxy
from bench.testbed import HTTP_PORT, Testbed, Variant
from mesh.spiffe import SpiffeId

LAB_NAME = "amwpbench"
NAMESPACE = "wpb"
CLIENT, SERVER = f"{NAMESPACE}/client", f"{NAMESPACE}/server"
MESH_WAYPOINT, ENVOY_WAYPOINT = "waypoint", "envoy-waypoint"  # Gateway = pod = SA name
SERVICE_PORT = 80
# variant -> (Service, its waypoint); the first is the baseline of the "added" rows
SERVICES = {
    "l4": ("web-l4", ""),
    "ambimesh": ("web", MESH_WAYPOINT),
    "envoy": ("web-envoy", ENVOY_WAYPOINT),
}
VARIANTS = tuple(SERVICES)
# Both waypoints route by these: a header match that wrk's requests miss, then the
# default rule, both to the Service's endpoints; per request each proxy evaluates one
# header match and falls through to the second rule.
ROUTES = [Route("canary", ("x-bench-route", "canary")), Route("default")]
STOP_TIMEOUT = 10.0
ACCESS_MARKER = "waypoint.access: "
ENVOY_ACCESS_LOG = "envoy-waypoint-access.log"
ACCESS_LOG_WAIT = 5.0  # s; Envoy flushes its access log every second

Document = dict[str, Any]


def _meta(kind: str, name: str, api: str = "v1", **labels: str) -> Document:
    meta: Document = {"name": name, "namespace": NAMESPACE}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": api, "kind": kind, "metadata": meta}


def _pod(name: str, node: str, labels: dict[str, str], sa: str) -> Document:
    pod = _meta("Pod", name, **labels)
    pod["spec"] = {
        "nodeName": node,
        "serviceAccountName": sa,
        "containers": [{"name": "shell", "command": ["sleep", "infinity"]}],
    }
    return pod


def virtual_service(service: str, routes: list[Route]) -> Document:
    """:data:`ROUTES` as Istio writes them: one ``http`` rule per route, in order."""
    rules = []
    for route in routes:
        rule: Document = {"name": route.name, "route": [{"destination": {"host": service}}]}
        if route.header is not None:
            name, value = route.header
            rule["match"] = [{"headers": {name: {"exact": value}}}]
        rules.append(rule)
    vs = _meta("VirtualService", service, "networking.istio.io/v1")
    vs["spec"] = {"hosts": [service], "http": rules}
    return vs


def lab_documents() -> list[Document]:
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": {"ambimesh.io/dataplane-mode": "ambient"}},
    }
    strict = _meta("PeerAuthentication", "default", "security.istio.io/v1beta1")
    strict["spec"] = {"mtls": {"mode": "STRICT"}}
    docs = [namespace, strict]
    names = ("client", "server", MESH_WAYPOINT, ENVOY_WAYPOINT)
    docs += [_meta("ServiceAccount", name) for name in names]
    for gateway in (MESH_WAYPOINT, ENVOY_WAYPOINT):
        gw = _meta("Gateway", gateway, "gateway.networking.k8s.io/v1")
        gw["metadata"]["labels"] = {"istio.io/waypoint-for": "service"}
        gw["spec"] = {
            "gatewayClassName": "ambimesh-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        }
        docs.append(gw)
        docs.append(_pod(gateway, "node-2", {WAYPOINT_LABEL: gateway}, gateway))
    docs.append(_pod("client", "node-1", {"app": "client"}, "client"))
    docs.append(_pod("server", "node-2", {"app": "server"}, "server"))
    for service, waypoint in SERVICES.values():
        labels = {"ambimesh.io/use-waypoint": waypoint} if waypoint else {}
        svc = _meta("Service", service, **labels)
        svc["spec"] = {
            "selector": {"app": "server"},
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": HTTP_PORT}],
        }
        docs.append(svc)
    docs.append(virtual_service(SERVICES["ambimesh"][0], ROUTES))
    return docs


def access_routes(log: str) -> Counter[str]:
    """Requests per route name in a waypoint's JSON access lines: the whole line for
    Envoy's, after ``waypoint.access:`` in ambimesh's pod log (other lines are skipped)."""
    routes: Counter[str] = Counter()
    for line in log.splitlines():
        _, marker, rest = line.partition(ACCESS_MARKER)
        text = rest if marker else line
        if not text.startswith("{"):
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            routes[str(entry.get("route_name") or "")] += 1
    return routes


def write_config(dest: Path) -> Path:
    """The bundled lab's nodes and nothing else of it, plus this benchmark's objects."""
    (dest / "nodes.yaml").write_text((bundled_config_dir() / "nodes.yaml").read_text())
    (dest / "waypoint-bench.yaml").write_text(yaml.safe_dump_all(lab_documents(), sort_keys=False))
    return dest


class WaypointTestbed(Testbed):
    """The lab above; ``up`` gives the three variants (wrk in ``client`` to a Service VIP)."""

    def up(self, config_dir: Path) -> tuple[Variant, ...]:
        self.lab.up(config_dir=write_config(config_dir))
        self.work.mkdir(mode=0o700)
        plan = self.lab.load_plan()
        server = plan.pod(SERVER)
        self._start_backends(server)
        mesh = Proxy("waypoint", self._waypoint_process(plan.pod(MESH_WAYPOINT)))
        envoy_pid = self._start_envoy_waypoint(plan.pod(ENVOY_WAYPOINT), server)
        proxies = {"l4": (), "ambimesh": (mesh,), "envoy": (Proxy("waypoint", envoy_pid),)}
        vips = {s.name: s.vip for s in plan.services if s.namespace == NAMESPACE}
        variants = []
        for name, (service, _) in SERVICES.items():
            http = (vips[service], SERVICE_PORT)
            # no bulk test here: `bulk` is never dialed
            variants.append(Variant(name, CLIENT, http, http, proxies[name]))
        return tuple(variants)

    def check_routing(self) -> None:
        """After some traffic: each waypoint answered requests through one of its routes
        (ambimesh names its VirtualService rule, Envoy ROUTES' names), so neither column
        measures a path that skipped its waypoint or its route table. Envoy writes its
        access log out once a second: wait for it a little."""
        mesh = self.lab.load_plan().pod(MESH_WAYPOINT)
        names = {r.name for r in ROUTES}
        checks: dict[str, tuple[Path, Callable[[str], bool]]] = {
            "ambimesh": (self.lab.logs / f"pod-{mesh.namespace}-{mesh.name}.log", bool),
            "envoy": (self.work / ENVOY_ACCESS_LOG, names.__contains__),
        }
        for variant, (path, is_route) in checks.items():
            deadline = time.monotonic() + ACCESS_LOG_WAIT
            while True:
                routes = access_routes(path.read_text(errors="replace") if path.exists() else "")
                if any(n for name, n in routes.items() if is_route(name)):
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"{variant} waypoint logged no routed request: {path} {routes}")
                time.sleep(0.2)

    def _waypoint_process(self, pod: PodPlan) -> int:
        """The ``python -m waypoint`` the lab started in ``pod`` (beside its pause process)."""
        pids = [
            pid
            for pid in cgroups.pids(cgroups.pod_cgroup(self.lab.name, pod.node, pod.uid))
            if is_waypoint_command(_cmdline(pid))
        ]
        if len(pids) != 1:
            raise LabError(f"expected one waypoint process in pod {pod.ref}, found pids {pids}")
        return pids[0]

    def _start_envoy_waypoint(self, pod: PodPlan, server: PodPlan) -> int:
        """Stop the ambimesh waypoint the lab started in ``pod`` and run Envoy there: the
        controller then still lists the pod's address as the waypoint's, and the ztunnels
        send ``web-envoy``'s traffic to whatever listens on its 15008."""
        _kill_and_wait(self._waypoint_process(pod))
        identity = SpiffeId(CLUSTER_DOMAIN, pod.namespace, pod.service_account)
        tls = certs.issue(self.lab.root_cert.parent, identity, self.work / "certs", pod.name)
        upstream = envoy_waypoint.Upstream(
            server.address,
            HTTP_PORT,
            SpiffeId(CLUSTER_DOMAIN, server.namespace, server.service_account).uri,
        )
        cfg = envoy_waypoint.config(
            pod.address, tls, ROUTES, upstream, self.work / ENVOY_ACCESS_LOG
        )
        path = self.work / "envoy-waypoint.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = envoy.argv(envoy.envoy_binary(), path)
        return self._start(pod, "envoy-waypoint", argv, envoy.HBONE_PORT)


def is_waypoint_command(argv: list[str]) -> bool:
    """``[python, -m, waypoint, ...]``, as the lab starts the waypoint proxy."""
    return argv[1:3] == ["-m", "waypoint"]


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def _kill_and_wait(pid: int) -> None:
    """SIGKILL (SIGTERM would drain for 30 s) and wait until the process has exited."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT
    while _state(pid) not in ("", "Z"):
        if time.monotonic() > deadline:
            raise LabError(f"process {pid} did not exit after SIGKILL")
        time.sleep(0.05)


def _state(pid: int) -> str:
    """The process's state letter, "" once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    return stat[stat.rindex(")") + 2]
