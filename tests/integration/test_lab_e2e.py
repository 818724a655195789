"""End to end in the lab: real netns, veths, cgroups, eBPF, TLS, gRPC and processes.

One lab for the module (building it takes a few seconds); tests that change its
configuration put it back in a `finally`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from ambimesh.lab import demo
from ambimesh.lab.capture import fabric_capture
from ambimesh.lab.demo import controller_metrics, fetch_in_pod, istio_metrics
from ambimesh.lab.lab import AGENT_METRICS_PORT, Lab
from ambimesh.lab.netclient import http_get
from tests.integration.labs import log_text, logged, metric, running_lab, wait_until, write_config

pytestmark = pytest.mark.privileged

LAB_NAME = "amtest"
CLIENT_SA = "spiffe://cluster.local/ns/demo/sa/client"
LEGACY_SA = "spiffe://cluster.local/ns/legacy/sa/default"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LAB_NAME, l4_only=True) as built:
        yield built


def agent_gauge(lab: Lab, node: str, name: str) -> float:
    n = lab.load_plan().node(node)
    _, body = http_get(n.netns, n.address, AGENT_METRICS_PORT, "/metrics")
    for line in body.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from the agent's metrics on {node}")


def set_namespace_label(lab: Lab, namespace: str, value: str | None) -> None:
    """Edit the runtime YAML the controller watches, as a GitOps change would."""
    path = lab.config_dir / "namespaces.yaml"
    docs = list(yaml.safe_load_all(path.read_text()))
    for doc in docs:
        if doc["kind"] == "Namespace" and doc["metadata"]["name"] == namespace:
            labels = doc["metadata"].setdefault("labels", {})
            if value is None:
                labels.pop("ambimesh.io/dataplane-mode", None)
            else:
                labels["ambimesh.io/dataplane-mode"] = value
    write_config(path, yaml.safe_dump_all(docs, sort_keys=False))


def test_client_reaches_service_vip_over_mtls(lab: Lab, tmp_path: Path) -> None:
    plan = lab.load_plan()
    with fabric_capture(plan, "node-1", tmp_path / "fabric.pcap") as captured:
        result = fetch_in_pod(lab, "demo/client", "http://server/secret-path-1")
    assert result.returncode == 0, result.stderr
    assert '"pod": "server"' in result.stdout
    assert '"path": "/secret-path-1"' in result.stdout
    wire = captured[0]
    assert wire.packets > 0, "nothing crossed the fabric: the capture or the route is broken"
    assert 15008 in wire.ports(), "the call did not travel as HBONE"
    assert 8080 not in wire.ports() and 80 not in wire.ports(), "plain TCP crossed the fabric"
    assert not wire.contains(b"secret-path-1"), "the request crossed the fabric in plaintext"

    server_side = istio_metrics(lab, "node-2")
    assert (
        metric(
            server_side,
            "istio_tcp_connections_opened_total",
            reporter="destination",
            source_principal=CLIENT_SA,
            connection_security_policy="mutual_tls",
            destination_workload="server",
            source_workload="client",
            destination_service="server.demo.svc.cluster.local",
        )
        >= 1
    )
    client_side = istio_metrics(lab, "node-1")
    assert (
        metric(
            client_side,
            "istio_tcp_sent_bytes_total",
            reporter="source",
            destination_service="server.demo.svc.cluster.local",
            destination_principal="spiffe://cluster.local/ns/demo/sa/server",
        )
        > 0
    )
    assert logged(
        lab,
        "ztunnel-node-2",
        "inbound complete",
        f"src.identity={CLIENT_SA}",
        "dst.workload=demo/server",
        "via=hbone",
    )
    assert agent_gauge(lab, "node-1", "ambimesh_bpf_outbound_redirected_total") >= 1
    # one pod: connect4/6, sockops, getpeername4/6 and its sk_lookup link; ztunnel's getsockopt
    assert agent_gauge(lab, "node-1", "ambimesh_bpf_programs_attached") == 7


def test_admin_endpoint_dumps_config_on_localhost_only(lab: Lab) -> None:
    node = lab.load_plan().node("node-2")
    status, body = http_get(node.netns, "127.0.0.1", 15000, "/config_dump")
    assert status == 200
    dump = json.loads(body)
    pods = {p["pod"]: p for p in dump["local_pods"]}
    assert pods["demo/server"]["hbone_serving"] is True
    assert pods["demo/server"]["identity"] == "spiffe://cluster.local/ns/demo/sa/server"
    assert "spiffe://cluster.local/ns/demo/sa/server" in dump["certificates"]
    assert {w["name"] for w in dump["workloads"]} >= {"client", "server", "legacy-client"}
    with pytest.raises(OSError):
        http_get(node.netns, node.address, 15000, "/config_dump", timeout=2)


def test_ztunnel_froze_its_startup_heap(lab: Lab) -> None:
    """A full garbage collection in a serving ztunnel never walks what it loaded at startup
    (it stalled the event loop for milliseconds); admin view's /runtime says so."""
    for node in ("node-1", "node-2"):
        netns = lab.load_plan().node(node).netns
        status, body = http_get(netns, "127.0.0.1", 15000, "/runtime")
        assert status == 200
        assert json.loads(body)["gc"]["frozen_objects"] > 10_000, node


def test_legacy_client_is_plain_tcp_and_refused_by_strict_server(lab: Lab, tmp_path: Path) -> None:
    plan = lab.load_plan()
    server_ip = plan.pod("demo/server").address
    redirected_before = agent_gauge(lab, "node-1", "ambimesh_bpf_outbound_redirected_total")
    with fabric_capture(plan, "node-1", tmp_path / "fabric.pcap") as captured:
        result = fetch_in_pod(lab, "legacy/legacy-client", f"http://{server_ip}:8080/legacy-1")
    assert result.returncode != 0, f"plaintext reached a STRICT workload: {result.stdout}"
    ports = captured[0].ports()
    assert 8080 in ports and 15008 not in ports, f"expected plain TCP to 8080, saw ports {ports}"
    assert agent_gauge(lab, "node-1", "ambimesh_bpf_outbound_redirected_total") == redirected_before
    assert "requires mTLS (PeerAuthentication STRICT)" in log_text(lab, "ztunnel-node-2")
    assert "/legacy-1" not in log_text(lab, "pod-demo-server"), "the app saw the request"


def test_enrolling_a_namespace_at_runtime_and_back(lab: Lab) -> None:
    plan = lab.load_plan()
    server_ip = plan.pod("demo/server").address
    enrolled_before = agent_gauge(lab, "node-1", "ambimesh_enrolled_pods")
    converged_before = controller_metrics(lab)["pilot_proxy_convergence_time_count"]
    try:
        set_namespace_label(lab, "legacy", "ambient")
        wait_until(
            lambda: agent_gauge(lab, "node-1", "ambimesh_enrolled_pods") == enrolled_before + 1,
            "legacy-client to be enrolled",
        )
        # Every node's agent and ztunnel ACKed the relabel's version: each one timed.
        wait_until(
            lambda: (
                controller_metrics(lab)["pilot_proxy_convergence_time_count"]
                >= converged_before + 2 * len(plan.nodes)
            ),
            "the controller to count every node's convergence",
        )
        lab.wait_ready()
        result = fetch_in_pod(lab, "legacy/legacy-client", f"http://{server_ip}:8080/enrolled")
        assert result.returncode == 0, result.stderr
        assert (
            metric(
                istio_metrics(lab, "node-2"),
                "istio_tcp_connections_opened_total",
                reporter="destination",
                source_principal=LEGACY_SA,
            )
            >= 1
        )
        # legacy is PERMISSIVE now; a tunnel aimed at ztunnel's own inbound port must not
        # loop back into ztunnel
        legacy_ip = plan.pod("legacy/legacy-client").address
        looped = fetch_in_pod(lab, "demo/client", f"http://{legacy_ip}:15006/loop")
        assert looped.returncode != 0
        wait_until(
            lambda: (
                f"{legacy_ip}:15006 refused: not an app port" in log_text(lab, "ztunnel-node-1")
            ),
            "ztunnel to refuse the tunnel to its own port",
        )
    finally:
        set_namespace_label(lab, "legacy", None)
    wait_until(
        lambda: agent_gauge(lab, "node-1", "ambimesh_enrolled_pods") == enrolled_before,
        "legacy-client to be released",
    )
    result = fetch_in_pod(lab, "legacy/legacy-client", f"http://{server_ip}:8080/released")
    assert result.returncode != 0, "a released pod still went through the mesh"


CERT_PROBE = """
import sys
from mesh.cert_client import CertificateError, request_certificate
from mesh.csr import make_key_and_csr
from mesh.spiffe import SpiffeId
controller, root, token, ns, sa = sys.argv[1:]
_, csr = make_key_and_csr(SpiffeId("cluster.local", ns, sa))
try:
    chain, _ = request_certificate(controller, open(root, "rb").read(),
                                   open(token).read().strip(), csr, 3600)
    print("ISSUED", len(chain))
except CertificateError as exc:
    print("REFUSED", exc.code.name if exc.code else "?")
"""


def request_cert_as(lab: Lab, node: str, namespace: str, sa: str) -> str:
    plan = lab.load_plan()
    argv = [
        "ip",
        "netns",
        "exec",
        plan.node(node).netns,
        sys.executable,
        "-c",
        CERT_PROBE,
        plan.controller_target,
        str(lab.root_cert),
        str(lab.node_dir(node) / "token"),
        namespace,
        sa,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_node_gets_certificates_only_for_its_own_pods(lab: Lab) -> None:
    before = controller_metrics(lab)
    assert before["pilot_xds"] >= 2 * len(lab.load_plan().nodes)  # agents' and ztunnels'
    assert request_cert_as(lab, "node-1", "demo", "client").startswith("ISSUED")
    assert request_cert_as(lab, "node-1", "demo", "server") == "REFUSED PERMISSION_DENIED"
    assert request_cert_as(lab, "node-2", "demo", "server").startswith("ISSUED")
    after = controller_metrics(lab)
    denied = "ambimesh_controller_certificates_denied_total"
    assert after[denied] == before[denied] + 1
    issued = "citadel_server_success_cert_issuance_count"
    assert after[issued] >= before[issued] + 2


PEER_PROBE = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("%s:%d" % s.getpeername())
s.close()
"""


def test_destination_outside_the_mesh_passes_through_as_plain_tcp(lab: Lab) -> None:
    plan = lab.load_plan()
    outside = (plan.controller_address, 15012)  # the control plane is not a mesh workload
    redirected_before = agent_gauge(lab, "node-1", "ambimesh_bpf_outbound_redirected_total")
    result = lab.run("demo/client", ["python", "-c", PEER_PROBE, outside[0], str(outside[1])])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{outside[0]}:{outside[1]}", "getpeername() was not restored"
    assert agent_gauge(lab, "node-1", "ambimesh_bpf_outbound_redirected_total") > redirected_before
    wait_until(
        lambda: logged(
            lab,
            "ztunnel-node-1",
            "outbound complete",
            f"dst.addr={outside[0]}:{outside[1]}",
            "via=tcp",
        ),
        "ztunnel to log the passthrough",
    )


def test_agent_crash_keeps_capture_and_a_new_agent_adopts_it(lab: Lab) -> None:
    server_ip = lab.load_plan().pod("demo/server").address
    lab.kill_component("node-2", "agent")
    try:
        through_mesh = fetch_in_pod(lab, "demo/client", "http://server/agent-down")
        assert through_mesh.returncode == 0, through_mesh.stderr
        plaintext = fetch_in_pod(lab, "legacy/legacy-client", f"http://{server_ip}:8080/plain")
        assert plaintext.returncode != 0, "with its agent dead, a STRICT pod took plaintext"
        assert "/plain" not in log_text(lab, "pod-demo-server")
    finally:
        lab.start_component("node-2", "agent")
    lab.wait_ready()
    # demo/server and demo/client-2: six programs each (five on the cgroup, sk_lookup on the
    # netns), and getsockopt on ztunnel's cgroup.
    assert agent_gauge(lab, "node-2", "ambimesh_enrolled_pods") == 2
    assert agent_gauge(lab, "node-2", "ambimesh_bpf_programs_attached") == 13
    assert logged(lab, "agent-node-2", "enrolled pod demo/server")
    assert fetch_in_pod(lab, "demo/client", "http://server/agent-back").returncode == 0
    plaintext = fetch_in_pod(lab, "legacy/legacy-client", f"http://{server_ip}:8080/plain-2")
    assert plaintext.returncode != 0


def test_ztunnel_restart_fails_closed_then_resyncs(lab: Lab) -> None:
    server_ip = lab.load_plan().pod("demo/server").address
    dropped_before = agent_gauge(lab, "node-2", "ambimesh_bpf_inbound_dropped_total")
    lab.kill_component("node-2", "ztunnel")
    try:
        wait_until(
            lambda: (
                agent_gauge(lab, "node-2", "ambimesh_ztunnel_connected") == 0
                or fetch_in_pod(
                    lab, "legacy/legacy-client", f"http://{server_ip}:8080/x"
                ).returncode
                != 0
            ),
            "node-2's ztunnel to be gone",
        )
        plaintext = fetch_in_pod(lab, "legacy/legacy-client", f"http://{server_ip}:8080/no-zt")
        assert plaintext.returncode != 0, "with ztunnel gone, a STRICT pod took plaintext"
        assert "/no-zt" not in log_text(lab, "pod-demo-server")
        assert agent_gauge(lab, "node-2", "ambimesh_bpf_inbound_dropped_total") > dropped_before
    finally:
        lab.start_component("node-2", "ztunnel")
    lab.wait_ready()
    assert fetch_in_pod(lab, "demo/client", "http://server/zt-back").returncode == 0


def test_the_demo_passes_its_own_checks(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.run(lab) == 0
    out = capsys.readouterr().out
    assert f"authenticated the caller of demo/server as: {CLIENT_SA}" in out
    assert "no plaintext of the request" in out


HELD_OPEN = """
import socket, sys
s = socket.create_connection(("server", 80), timeout=30)
print("connected", flush=True)
sys.stdin.readline()
s.sendall(b"GET /survivor HTTP/1.0\\r\\nHost: server\\r\\n\\r\\n")
print(b"".join(iter(lambda: s.recv(65536), b"")).decode(), flush=True)
"""


def test_established_connection_survives_agent_restarts(lab: Lab) -> None:
    client = lab.spawn_in_pod(
        "demo/client", ["python", "-c", HELD_OPEN], capture=True, stdin=subprocess.PIPE
    )
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == b"connected"
        for node in ("node-1", "node-2"):
            lab.kill_component(node, "agent")
            lab.start_component(node, "agent")
        lab.wait_ready()
        client.stdin.write(b"go\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=30)
        assert client.returncode == 0, err.decode()
        assert b"200 OK" in out and b'"path": "/survivor"' in out
    finally:
        client.kill()
        client.wait()


def mtls_calls_from_client(lab: Lab) -> float:
    return metric(
        istio_metrics(lab, "node-2"),
        "istio_tcp_connections_opened_total",
        reporter="destination",
        source_principal=CLIENT_SA,
        destination_workload="server",
        connection_security_policy="mutual_tls",
    )


def assert_first_calls_work_over_mtls(lab: Lab, tag: str, calls: int = 5) -> None:
    """No warm-up allowed: a stale tunnel would fail exactly these first calls."""
    before = mtls_calls_from_client(lab)
    for i in range(calls):
        result = fetch_in_pod(lab, "demo/client", f"http://server/{tag}-{i}")
        assert result.returncode == 0, f"call {i} after {tag} failed: rc {result.returncode}"
    wait_until(
        lambda: mtls_calls_from_client(lab) >= before + calls,
        f"the {calls} calls to show up as mTLS on the server side",
    )


class Traffic:
    """Calls server's pod IP from client in a loop (bounded) while a test changes things."""

    def __init__(self, lab: Lab, url: str, limit_seconds: float = 120.0) -> None:
        self.lab, self.url, self.limit = lab, url, limit_seconds
        self.results: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.results.append(fetch_in_pod(self.lab, "demo/client", self.url).returncode)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=40)


def enrolled(lab: Lab, demo: bool) -> Callable[[], bool]:
    """Each node's enrolled gauge counts its demo pods (all of demo, or none of it)."""
    pods = lab.load_plan().pods
    return lambda: all(
        agent_gauge(lab, node, "ambimesh_enrolled_pods")
        == (
            sum(p.node == node and p.namespace == "demo" and not p.waypoint for p in pods)
            if demo
            else 0
        )
        for node in ("node-1", "node-2")
    )


def test_relabeling_none_and_back_while_traffic_runs(lab: Lab) -> None:
    """ambient -> none -> ambient, three times under load; the first call after works."""
    server_ip = lab.load_plan().pod("demo/server").address
    assert_first_calls_work_over_mtls(lab, "warm-pool")  # the client's pool holds a tunnel
    try:
        with Traffic(lab, f"http://{server_ip}:8080/during") as traffic:
            for _ in range(3):
                set_namespace_label(lab, "demo", "none")
                wait_until(enrolled(lab, False), "demo's pods to be released")
                set_namespace_label(lab, "demo", "ambient")
                wait_until(enrolled(lab, True), "demo's pods to be enrolled again")
                lab.wait_ready()
        assert traffic.results, "the background traffic never ran"
    finally:
        set_namespace_label(lab, "demo", "ambient")
    assert_first_calls_work_over_mtls(lab, "relabeled")


def test_server_pod_recreated_with_the_same_ip(lab: Lab) -> None:
    old = lab.load_plan().pod("demo/server")
    assert_first_calls_work_over_mtls(lab, "before-recreate")
    released = log_text(lab, "agent-node-2").count("released pod demo/server")
    new = lab.recreate_pod("demo/server")
    assert (new.address, new.node) == (old.address, old.node) and new.uid != old.uid
    wait_until(
        lambda: log_text(lab, "agent-node-2").count("released pod demo/server") > released,
        "the old pod to be released",
    )
    wait_until(enrolled(lab, True), "the new pod to be enrolled")
    lab.wait_ready()
    assert_first_calls_work_over_mtls(lab, "recreated")
    plaintext = fetch_in_pod(lab, "legacy/legacy-client", f"http://{new.address}:8080/plain")
    assert plaintext.returncode != 0, "the re-created STRICT pod took plaintext"
