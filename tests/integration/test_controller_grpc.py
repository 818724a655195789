"""A real controller process (``python -m controller``) and the real node clients, on
loopback with TLS: push snapshot + deltas, ACK/NACK, CA authorization, node auth, and
the metrics it serves over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from mesh.api import mesh_pb2, mesh_pb2_grpc
from mesh.cert_client import CertificateError, request_certificate
from mesh.csr import make_key_and_csr
from mesh.push_client import ConfigRejected, PushClient
from mesh.spiffe import SpiffeId

REPO = Path(__file__).resolve().parents[2]
TOKENS = {"node-a": "token-a-0123456789", "node-b": "token-b-0123456789"}

BASE = """\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {ambimesh.io/dataplane-mode: ambient}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"""


def pod_yaml(name: str, node: str, sa: str, ip: str) -> str:
    return f"""\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo, labels: {{app: {sa}}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}}}
status: {{podIP: {ip}}}
"""


@dataclass
class Controller:
    process: subprocess.Popen[bytes]
    target: str
    config_dir: Path
    root_pem: bytes
    log_path: Path
    tmp_path: Path
    metrics_port: int

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def restart(self) -> None:
        """Stop and start again on the same port, state (root CA) and config directory."""
        self.stop()
        self.process = launch(self.tmp_path, self.target, self.log_path, self.metrics_port)

    def metrics(self) -> dict[str, float]:
        """Every sample of ``/metrics``: ``name{label="value",...}`` -> value."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            sample.name
            + "".join(f'{{{k}="{v}"}}' for k, v in sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def controller_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "controller", *map(str, args)]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def launch(
    tmp_path: Path, target: str, log_path: Path, metrics_port: int
) -> subprocess.Popen[bytes]:
    port = int(target.rpartition(":")[2])
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            controller_command(
                "--config-dir",
                tmp_path / "config",
                "--state-dir",
                tmp_path / "state",
                "--tokens",
                tmp_path / "tokens.yaml",
                "--listen",
                target,
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                "--log-level",
                "DEBUG",
            ),
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: process.poll() is not None or port_open(port), 20, "the controller to listen"
        )
    except AssertionError:
        process.kill()
        process.wait(5)
        raise
    assert process.poll() is None, f"controller exited:\n{log_path.read_text()}"
    return process


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "base.yaml").write_text(BASE)
    (config_dir / "pods.yaml").write_text(
        pod_yaml("web-1", "node-a", "web", "10.1.0.2")
        + "---\n"
        + pod_yaml("db-1", "node-b", "db", "10.2.0.2")
    )
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("".join(f"{node}: {token}\n" for node, token in TOKENS.items()))
    tokens.chmod(0o600)
    target = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "controller.log"
    metrics_port = free_port()
    process = launch(tmp_path, target, log_path, metrics_port)
    running = Controller(
        process,
        target,
        config_dir,
        (tmp_path / "state" / "root-cert.pem").read_bytes(),
        log_path,
        tmp_path,
        metrics_port,
    )
    try:
        yield running
    finally:
        running.stop()


class Recorder:
    """An on_update callback that records states and can be told to reject some."""

    def __init__(self, reject_key: str | None = None) -> None:
        self.reject_key = reject_key
        self.updates: list[tuple[str, dict[str, mesh_pb2.Resource]]] = []
        self._lock = threading.Lock()

    def __call__(self, version: str, state: Mapping[str, mesh_pb2.Resource]) -> None:
        if self.reject_key is not None and self.reject_key in state:
            raise ConfigRejected(f"{self.reject_key} is poisonous")
        with self._lock:
            self.updates.append((version, dict(state)))

    def latest(self) -> dict[str, mesh_pb2.Resource]:
        with self._lock:
            return self.updates[-1][1] if self.updates else {}


@pytest.fixture
def clients() -> Iterator[list[PushClient]]:
    started: list[PushClient] = []
    try:
        yield started
    finally:
        for client in started:
            client.stop(5)


def connect(
    controller: Controller, clients: list[PushClient], recorder: Recorder, node: str = "node-a"
) -> PushClient:
    client = PushClient(
        controller.target, controller.root_pem, TOKENS[node], node, recorder, initial_backoff=0.1
    )
    clients.append(client)
    client.start()
    assert client.wait_synced(15), f"no configuration synced:\n{controller.log()}"
    return client


def test_snapshot_then_delta_after_a_file_edit(
    controller: Controller, clients: list[PushClient]
) -> None:
    recorder = Recorder()
    client = connect(controller, clients, recorder)
    assert set(client.resources) == {
        "workload/demo/web-1",
        "workload/demo/db-1",
        "peer_authentication/istio-system/default",
    }
    pa = client.resources["peer_authentication/istio-system/default"].peer_authentication
    assert (pa.scope, pa.mode) == (mesh_pb2.MESH, mesh_pb2.STRICT)
    assert client.resources["workload/demo/web-1"].workload.ambient
    first = client.version

    (controller.config_dir / "pods.yaml").write_text(pod_yaml("web-1", "node-a", "web", "10.1.0.9"))
    wait_until(lambda: "workload/demo/db-1" not in recorder.latest(), 10, "the delta")
    assert list(client.resources["workload/demo/web-1"].workload.addresses) == ["10.1.0.9"]
    assert int(client.version) > int(first)
    assert f"node node-a applied version {client.version}" in controller.log()


def test_nack_keeps_the_last_good_state(controller: Controller, clients: list[PushClient]) -> None:
    recorder = Recorder(reject_key="workload/demo/poison")
    client = connect(controller, clients, recorder)
    good_version, good = client.version, dict(client.resources)

    (controller.config_dir / "poison.yaml").write_text(
        pod_yaml("poison", "node-a", "web", "10.1.0.66")
    )
    wait_until(
        lambda: "rejected version" in controller.log(), 10, "the NACK to reach the controller"
    )
    assert "node node-a rejected version" in controller.log()
    assert "workload/demo/poison is poisonous" in controller.log()
    assert client.version == good_version
    assert dict(client.resources) == good

    (controller.config_dir / "poison.yaml").write_text(
        pod_yaml("web-2", "node-a", "web", "10.1.0.3")
    )
    wait_until(lambda: "workload/demo/web-2" in client.resources, 10, "the next good version")
    assert "workload/demo/poison" not in client.resources
    assert set(client.resources) == set(good) | {"workload/demo/web-2"}


def test_bad_yaml_edit_keeps_serving_the_last_good_config(
    controller: Controller, clients: list[PushClient]
) -> None:
    client = connect(controller, clients, Recorder())
    version = client.version
    (controller.config_dir / "broken.yaml").write_text("kind: [\n")
    wait_until(lambda: "broken.yaml" in controller.log(), 10, "the rejection to be logged")
    (controller.config_dir / "more.yaml").write_text(pod_yaml("web-3", "node-a", "web", "10.1.0.4"))
    time.sleep(1.0)
    assert client.version == version
    (controller.config_dir / "broken.yaml").unlink()
    wait_until(lambda: "workload/demo/web-3" in client.resources, 10, "the fixed configuration")


def service_yaml(name: str, vip: str) -> str:
    return f"""\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec: {{clusterIP: {vip}, selector: {{app: web}}, ports: [{{port: 80}}]}}
"""


def test_a_second_service_on_a_vip_is_rejected_and_the_first_keeps_it(
    controller: Controller, clients: list[PushClient]
) -> None:
    (controller.config_dir / "svc-a.yaml").write_text(service_yaml("a", "10.96.0.10"))
    client = connect(controller, clients, Recorder())
    wait_until(lambda: "service/demo/a" in client.resources, 10, "service a")
    version = client.version

    (controller.config_dir / "svc-b.yaml").write_text(service_yaml("b", "10.96.0.10"))
    wait_until(lambda: "already belongs" in controller.log(), 10, "the rejection")
    rejection = next(line for line in controller.log().splitlines() if "already belongs" in line)
    assert f"{controller.config_dir / 'svc-b.yaml'}#1: Service demo/b: spec.clusterIP" in rejection
    assert f"Service demo/a ({controller.config_dir / 'svc-a.yaml'}#1)" in rejection
    time.sleep(1.0)
    assert client.version == version
    assert "service/demo/b" not in client.resources
    assert list(client.resources["service/demo/a"].service.addresses) == ["10.96.0.10"]

    (controller.config_dir / "svc-b.yaml").write_text(service_yaml("b", "10.96.0.11"))
    wait_until(lambda: "service/demo/b" in client.resources, 10, "service b elsewhere")


def test_node_gets_certificates_only_for_its_own_pods(controller: Controller) -> None:
    web = SpiffeId("cluster.local", "demo", "web")
    _, csr = make_key_and_csr(web)
    chain, root = request_certificate(
        controller.target, controller.root_pem, TOKENS["node-a"], csr, 3600
    )
    assert root == controller.root_pem
    leaf = x509.load_pem_x509_certificate(chain[0])
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(root))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [web.uri]

    db = SpiffeId("cluster.local", "demo", "db")
    _, csr = make_key_and_csr(db)
    with pytest.raises(CertificateError) as info:
        request_certificate(controller.target, controller.root_pem, TOKENS["node-a"], csr, 3600)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert db.uri in str(info.value) and "node node-a" in str(info.value)


def test_bad_csr_is_invalid_argument(controller: Controller) -> None:
    with pytest.raises(CertificateError) as info:
        request_certificate(controller.target, controller.root_pem, TOKENS["node-a"], b"nope", 60)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_token_is_unauthenticated(controller: Controller) -> None:
    _, csr = make_key_and_csr(SpiffeId("cluster.local", "demo", "web"))
    with pytest.raises(CertificateError) as info:
        request_certificate(controller.target, controller.root_pem, "wrong", csr, 60)
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "join token" in str(info.value)

    credentials = grpc.ssl_channel_credentials(root_certificates=controller.root_pem)
    with grpc.secure_channel(controller.target, credentials) as channel:
        stream = mesh_pb2_grpc.DiscoveryStub(channel).Stream(
            iter([mesh_pb2.DiscoveryRequest(node="node-a")]),
            metadata=(("authorization", "Bearer wrong"),),
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as rpc:
            next(iter(stream))
    assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_file_edits_apply_without_restart(controller: Controller) -> None:
    tokens = controller.tmp_path / "tokens.yaml"
    tokens.write_text(tokens.read_text() + "node-c: token-c-0123456789\n")
    _, csr = make_key_and_csr(SpiffeId("cluster.local", "demo", "web"))
    with pytest.raises(CertificateError) as info:
        request_certificate(controller.target, controller.root_pem, "token-c-0123456789", csr, 60)
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED, "node-c is known but runs no pods"


def test_stream_naming_another_node_is_denied(controller: Controller) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=controller.root_pem)
    with grpc.secure_channel(controller.target, credentials) as channel:
        stream = mesh_pb2_grpc.DiscoveryStub(channel).Stream(
            iter([mesh_pb2.DiscoveryRequest(node="node-b")]),
            metadata=(("authorization", f"Bearer {TOKENS['node-a']}"),),
            timeout=10,
        )
        with pytest.raises(grpc.RpcError) as rpc:
            for _ in stream:
                pass
    assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "authenticated as node node-a" in str(rpc.value.details())


def test_client_reconnects_and_the_new_snapshot_replaces_its_state(
    controller: Controller, clients: list[PushClient]
) -> None:
    client = connect(controller, clients, Recorder())
    assert "workload/demo/db-1" in client.resources
    controller.stop()
    (controller.config_dir / "pods.yaml").write_text(pod_yaml("web-9", "node-a", "web", "10.1.0.9"))
    controller.restart()
    wait_until(lambda: "workload/demo/web-9" in client.resources, 20, "the client to resync")
    assert "workload/demo/db-1" not in client.resources
    assert "workload/demo/web-1" not in client.resources


def test_restart_with_nodes_connected_ends_streams_cleanly_and_keeps_the_root(
    controller: Controller, clients: list[PushClient]
) -> None:
    """A controller upgrade or outage: streams end without errors in the log, the node's
    on_connected hook fires again once it is back, and certificates chain to the same root."""
    connected = threading.Semaphore(0)
    client = PushClient(
        controller.target,
        controller.root_pem,
        TOKENS["node-a"],
        "node-a",
        Recorder(),
        on_connected=connected.release,
        initial_backoff=0.1,
    )
    clients.append(client)
    client.start()
    assert connected.acquire(timeout=15), f"never connected:\n{controller.log()}"
    assert controller.stop() == 0
    assert "Traceback" not in controller.log() and "ERROR" not in controller.log()
    assert not connected.acquire(timeout=0.5)  # no stream while the controller is away

    controller.process = launch(
        controller.tmp_path, controller.target, controller.log_path, controller.metrics_port
    )
    assert connected.acquire(timeout=15), f"never reconnected:\n{controller.log()}"
    assert client.version == "1"  # the restarted controller counts from 1 again: taken
    _, csr = make_key_and_csr(SpiffeId("cluster.local", "demo", "web"))
    chain, root = request_certificate(
        controller.target, controller.root_pem, TOKENS["node-a"], csr, 3600
    )
    assert root == controller.root_pem
    x509.load_pem_x509_certificate(chain[0]).verify_directly_issued_by(
        x509.load_pem_x509_certificate(root)
    )


def test_metrics_count_pushes_convergence_certificates_and_rejections(
    controller: Controller, clients: list[PushClient]
) -> None:
    client = connect(controller, clients, Recorder(reject_key="workload/demo/poison"))
    (controller.config_dir / "more.yaml").write_text(pod_yaml("web-2", "node-a", "web", "10.1.0.3"))
    wait_until(lambda: "workload/demo/web-2" in client.resources, 10, "the delta")
    (controller.config_dir / "poison.yaml").write_text(
        pod_yaml("poison", "node-a", "web", "10.1.0.66")
    )
    wait_until(lambda: "rejected version" in controller.log(), 10, "the NACK")
    (controller.config_dir / "broken.yaml").write_text("kind: [\n")
    wait_until(lambda: "broken.yaml" in controller.log(), 10, "the refused configuration")

    web, db = SpiffeId("cluster.local", "demo", "web"), SpiffeId("cluster.local", "demo", "db")
    request_certificate(
        controller.target, controller.root_pem, TOKENS["node-a"], make_key_and_csr(web)[1], 60
    )
    for token, csr in [
        (TOKENS["node-a"], make_key_and_csr(db)[1]),  # db runs on node-b
        (TOKENS["node-a"], b"not a CSR"),
        ("wrong", make_key_and_csr(web)[1]),
    ]:
        with pytest.raises(CertificateError):
            request_certificate(controller.target, controller.root_pem, token, csr, 60)

    m = controller.metrics()
    assert m["pilot_xds"] == 1
    # The snapshot, the web-2 delta, the poison delta; one NACK.
    assert m['pilot_xds_pushes{type="wds"}'] == 3
    assert m['pilot_total_xds_rejects{type="wds"}'] == 1
    # Only the web-2 ACK converged a change: the first is the connect, poison was NACKed.
    assert m["pilot_proxy_convergence_time_count"] == 1
    assert 0 < m["pilot_proxy_convergence_time_sum"] < 10
    assert m['pilot_proxy_convergence_time_bucket{le="10.0"}'] == 1
    assert m["ambimesh_controller_config_versions_total"] == 3  # pods, web-2, poison
    assert m["ambimesh_controller_config_rejects_total"] == 1  # broken.yaml
    assert m["citadel_server_csr_count"] == 4
    assert m["citadel_server_success_cert_issuance_count"] == 1
    assert m["ambimesh_controller_certificates_denied_total"] == 1
    assert m["citadel_server_csr_parsing_err_count"] == 1
    assert m["citadel_server_authentication_failure_count"] == 1
    root = x509.load_pem_x509_certificate(controller.root_pem)
    assert m["citadel_server_root_cert_expiry_timestamp"] == root.not_valid_after_utc.timestamp()
    assert m["process_resident_memory_bytes"] > 0

    client.stop(5)
    wait_until(lambda: controller.metrics()["pilot_xds"] == 0, 10, "the stream to end")


def test_sigterm_shuts_down_cleanly(controller: Controller) -> None:
    assert controller.stop() == 0
    assert "Traceback" not in controller.log()


@pytest.mark.parametrize(
    "problem", ["missing-config-dir", "port-in-use", "metrics-port-in-use", "unreadable-tokens"]
)
def test_startup_errors_are_one_line(tmp_path: Path, problem: str) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("node-a: t\n")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1] if problem == "port-in-use" else free_port()
    metrics_port = holder.getsockname()[1] if problem == "metrics-port-in-use" else free_port()
    if problem == "missing-config-dir":
        config_dir = tmp_path / "absent"
    if problem == "unreadable-tokens":
        tokens = tmp_path / "absent-tokens.yaml"
    try:
        result = subprocess.run(
            controller_command(
                "--config-dir",
                config_dir,
                "--state-dir",
                tmp_path / "state",
                "--tokens",
                tokens,
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
            ),
            cwd=REPO,
            capture_output=True,
            timeout=30,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    finally:
        holder.close()
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "ERROR" in line]
    assert len(lines) == 1, err
    expected = {
        "missing-config-dir": "does not exist",
        "port-in-use": "cannot listen",
        "metrics-port-in-use": "--metrics-listen",
        "unreadable-tokens": "tokens",
    }
    assert expected[problem] in lines[0]
