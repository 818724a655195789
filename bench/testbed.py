"""The benchmark's lab: the bundled cluster plus one plain server pod, backends, the Envoys.

All three variants cross the same hops: client pod on node-1 -> veth -> node-1 bridge ->
fabric -> node-2 bridge -> veth -> server pod, to an iperf3 and an nginx in the server pod.

- direct: ``legacy/legacy-client`` (not enrolled) -> ``legacy/plain-server`` (not enrolled):
  the raw netns/veth path, nothing in between.
- ambimesh: ``demo/client`` -> ``demo/server`` (enrolled, STRICT): captured by eBPF into
  node-1's ztunnel, HBONE to node-2's ztunnel, delivered from 127.0.0.6.
- envoy: ``legacy/legacy-client`` -> an Envoy on its loopback -> HBONE to an Envoy on
  ``legacy/plain-server``'s 15008 -> delivered to the pod's own address. The legacy pods are
  not enrolled, so the ztunnels see none of it.

Every process started here is a process of a lab pod (its cgroup), so ``lab down`` ends it
whatever happened.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ambimesh.lab import cgroups, procs
from ambimesh.lab.lab import Lab, LabError, bundled_config_dir
from ambimesh.lab.topology import CLUSTER_DOMAIN, PodPlan
from bench import certs, envoy
from bench.parsers import listening_ports
from bench.sampling import Proxy
from mesh.spiffe import SpiffeId

LAB_NAME = "ambench"
IPERF_PORT = 5201
HTTP_PORT = 8081
HTTP_BODY_BYTES = 1024
ENVOY_BULK_PORT = 15001  # on legacy-client's loopback
ENVOY_HTTP_PORT = 15002
MESH_CLIENT, MESH_SERVER = "demo/client", "demo/server"
PLAIN_CLIENT, PLAIN_SERVER = "legacy/legacy-client", "legacy/plain-server"
START_TIMEOUT = 30.0

PLAIN_SERVER_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "plain-server", "namespace": "legacy", "labels": {"app": "plain"}},
    "spec": {
        "nodeName": "node-2",
        "containers": [{"name": "shell", "command": ["sleep", "infinity"]}],
    },
}


@dataclass(frozen=True)
class Variant:
    """One way from the client pod to the server pod's backends."""

    name: str
    client_pod: str
    bulk: tuple[str, int]  # where iperf3 connects
    http: tuple[str, int]  # where wrk connects
    proxies: tuple[Proxy, ...]  # (client side, server side); none for direct

    @property
    def url(self) -> str:
        return f"http://{self.http[0]}:{self.http[1]}/"


def write_config(dest: Path) -> Path:
    """The bundled lab YAML unchanged, plus the plain server pod."""
    for path in bundled_config_dir().iterdir():
        if path.suffix in (".yaml", ".yml"):
            shutil.copy(path, dest / path.name)
    (dest / "zz-bench.yaml").write_text(yaml.safe_dump(PLAIN_SERVER_POD, sort_keys=False))
    return dest


def nginx_conf(workdir: Path, port: int, body_bytes: int) -> str:
    """One worker answering every request with a fixed body, unlimited keep-alive."""
    body = "x" * (body_bytes - 1)
    return f"""worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000000;
  keepalive_timeout 3600s;
  default_type text/plain;
  client_body_temp_path {workdir}/body;
  server {{
    listen {port} reuseport backlog=4096;
    location / {{ return 200 "{body}\\n"; }}
  }}
}}
"""


class Testbed:
    """Builds the lab and everything the variants need; ``down`` removes all of it."""

    def __init__(self, lab: Lab) -> None:
        """The proxies run ``lab.ztunnel_workers`` workers each (Envoy: ``--concurrency``)."""
        self.lab = lab
        self.workers = lab.ztunnel_workers
        self.work = lab.state / "bench"  # removed with the lab's state dir

    def up(self, config_dir: Path) -> tuple[Variant, ...]:
        self.lab.up(config_dir=write_config(config_dir))
        self.work.mkdir(mode=0o700)
        plan = self.lab.load_plan()
        mesh_server, plain_server = plan.pod(MESH_SERVER), plan.pod(PLAIN_SERVER)
        for pod in (mesh_server, plain_server):
            self._start_backends(pod)
        client_envoy, server_envoy = self._start_envoys(plan.pod(PLAIN_CLIENT), plain_server)
        loopback = "127.0.0.1"
        return (
            Variant(
                "direct",
                PLAIN_CLIENT,
                (plain_server.address, IPERF_PORT),
                (plain_server.address, HTTP_PORT),
                (),
            ),
            Variant(
                "ambimesh",
                MESH_CLIENT,
                (mesh_server.address, IPERF_PORT),
                (mesh_server.address, HTTP_PORT),
                (
                    self._ztunnel("client", plan.pod(MESH_CLIENT)),
                    self._ztunnel("server", mesh_server),
                ),
            ),
            Variant(
                "envoy",
                PLAIN_CLIENT,
                (loopback, ENVOY_BULK_PORT),
                (loopback, ENVOY_HTTP_PORT),
                (client_envoy, server_envoy),
            ),
        )

    def down(self) -> None:
        self.lab.down()

    def lab_cgroup(self) -> Path:
        return cgroups.lab_root(self.lab.name)

    def _ztunnel(self, side: str, pod: PodPlan) -> Proxy:
        pids = cgroups.pids(cgroups.component_cgroup(self.lab.name, pod.node, "ztunnel"))
        # One process, or a master, a supervisor and the workers.
        expected = 1 if self.workers == 1 else self.workers + 2
        if len(pids) != expected:
            raise LabError(f"expected {expected} ztunnel processes on {pod.node}, found {pids}")
        return Proxy(side, pids[0], tuple(pids[1:]))

    def _start_backends(self, pod: PodPlan) -> None:
        workdir = self.work / f"nginx-{pod.namespace}-{pod.name}"
        workdir.mkdir()
        (workdir / "nginx.conf").write_text(nginx_conf(workdir, HTTP_PORT, HTTP_BODY_BYTES))
        nginx = ["nginx", "-e", str(workdir / "error.log"), "-c", str(workdir / "nginx.conf")]
        self._start(pod, "nginx", nginx, HTTP_PORT)
        self._start(pod, "iperf3", ["iperf3", "-s", "-p", str(IPERF_PORT)], IPERF_PORT)

    def _start_envoys(self, client: PodPlan, server: PodPlan) -> tuple[Proxy, Proxy]:
        binary = envoy.envoy_binary()
        ca_dir = self.lab.root_cert.parent
        identities = {
            pod.name: SpiffeId(CLUSTER_DOMAIN, pod.namespace, pod.service_account)
            for pod in (client, server)
        }
        tls = {
            name: certs.issue(ca_dir, identity, self.work / "certs", name)
            for name, identity in identities.items()
        }
        backends = [(server.address, IPERF_PORT), (server.address, HTTP_PORT)]
        server_cfg = envoy.server_config(
            server.address, backends, tls[server.name], identities[client.name].uri
        )
        tunnels = {ENVOY_BULK_PORT: f"{server.address}:{IPERF_PORT}"}
        tunnels[ENVOY_HTTP_PORT] = f"{server.address}:{HTTP_PORT}"
        client_cfg = envoy.client_config(
            tunnels, server.address, tls[client.name], identities[server.name].uri
        )
        pids = []
        for side, pod, cfg, ports in (
            ("server", server, server_cfg, (envoy.HBONE_PORT,)),
            ("client", client, client_cfg, tuple(tunnels)),
        ):
            path = self.work / f"envoy-{side}.yaml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            command = envoy.argv(binary, path, self.workers)
            pids.append(self._start(pod, f"envoy-{side}", command, *ports))
        return Proxy("client", pids[1]), Proxy("server", pids[0])

    def _start(self, pod: PodPlan, name: str, argv: list[str], *ports: int) -> int:
        """Start ``argv`` as a process of ``pod`` and wait until it listens on ``ports``."""
        log = self.work / f"{name}-{pod.namespace}-{pod.name}.log"
        proc = procs.spawn(
            argv,
            cgroup=cgroups.pod_cgroup(self.lab.name, pod.node, pod.uid),
            netns_name=pod.netns,
            pod=True,
            log=log,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _listens(proc, ports):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise LabError(f"{name} in {pod.ref} did not listen on {ports}:\n{tail}")
            time.sleep(0.1)
        return proc.pid


def _listens(proc: subprocess.Popen[bytes], ports: tuple[int, ...]) -> bool:
    """Once ``ip netns exec`` has exec'd the program, its /proc/<pid>/net is the pod's
    (iperf3 listens on IPv6's ``::``, which takes IPv4 too)."""
    try:
        if Path(f"/proc/{proc.pid}/comm").read_text().strip() == "ip":
            return False
        tables = [Path(f"/proc/{proc.pid}/net/{t}").read_text() for t in ("tcp", "tcp6")]
    except OSError:
        return False
    return set(ports) <= set().union(*map(listening_ports, tables))
