"""L4 AuthorizationPolicy end to end in the lab: policies written into the runtime YAML
directory (as a GitOps change would) are enforced by the destination ztunnel on new
connections, and on open ones, within seconds; denials show in Istio's metrics and in the
access log by policy name. Real netns, eBPF, TLS, gRPC and processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from ambimesh.lab.demo import fetch_in_pod, istio_metrics
from ambimesh.lab.lab import Lab
from ambimesh.lab.netclient import http_get
from tests.integration.labs import (
    WAIT_SECONDS,
    logged,
    metric,
    running_lab,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.privileged

LAB_NAME = "amauthz"
CLIENT_SA = "spiffe://cluster.local/ns/demo/sa/client"
POLICY_FILE = "authz-e2e.yaml"
ADMIN_PORT = 15000


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LAB_NAME, l4_only=True) as built:
        yield built


@pytest.fixture
def policies(lab: Lab) -> Iterator[Callable[..., None]]:
    """Write the given objects as the test's policy file; removed (and waited out) after."""
    path = lab.config_dir / POLICY_FILE

    def write(*docs: dict[str, Any]) -> None:
        write_config(path, yaml.safe_dump_all(docs, sort_keys=False))

    try:
        yield write
    finally:
        path.unlink(missing_ok=True)
        wait_until(lambda: client_call(lab), "the call to work again after the test")


def authz(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, **spec},
    }


def client_call(lab: Lab, path: str = "/authz") -> bool:
    return fetch_in_pod(lab, "demo/client", f"http://server{path}").returncode == 0


def legacy_call(lab: Lab) -> bool:
    server_ip = lab.load_plan().pod("demo/server").address
    return fetch_in_pod(lab, "legacy/legacy-client", f"http://{server_ip}:8080/p").returncode == 0


def server_metric(lab: Lab, name: str, **labels: str) -> float:
    return metric(istio_metrics(lab, "node-2"), name, **labels)


def ztunnel_log_has(lab: Lab, *parts: str) -> bool:
    return logged(lab, "ztunnel-node-2", *parts)


def inbound_live(lab: Lab) -> bool:
    node = lab.load_plan().node("node-2")
    _, body = http_get(node.netns, "127.0.0.1", ADMIN_PORT, "/connections")
    return any(c["direction"] == "inbound" for c in json.loads(body))


def test_deny_policy_applies_live_and_names_itself(lab: Lab, policies: Callable[..., None]) -> None:
    assert client_call(lab, "/before")
    denied_before = server_metric(
        lab, "istio_tcp_connections_closed_total", response_flags="DENY", source_principal=CLIENT_SA
    )
    deny = {
        "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/client"]}}]}],
    }
    policies(authz("deny-client", deny))
    wait_until(lambda: not client_call(lab), "the DENY policy to refuse the client")
    assert (
        server_metric(
            lab,
            "istio_tcp_connections_closed_total",
            reporter="destination",
            response_flags="DENY",
            source_principal=CLIENT_SA,
            destination_workload="server",
        )
        > denied_before
    )
    assert ztunnel_log_has(lab, "inbound denied", CLIENT_SA, "policy=demo/deny-client")
    # Normal closes keep response_flags="-", so existing dashboards' series carry on.
    assert server_metric(lab, "istio_tcp_connections_closed_total", response_flags="-") >= 1

    policies()  # the policy removed: new connections work again
    wait_until(lambda: client_call(lab), "the call to work once the policy is gone")


def test_allow_for_another_principal_denies_by_default_and_namespace_rule_allows(
    lab: Lab, policies: Callable[..., None]
) -> None:
    other = {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/ops/sa/*"]}}]}]}
    policies(authz("allow-ops", other))
    wait_until(lambda: not client_call(lab), "an ALLOW for others to deny the client")
    wait_until(
        lambda: ztunnel_log_has(lab, "inbound denied", 'reason="allow policies exist, but none'),
        "the default-deny access-log line",
    )

    by_namespace = {"rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]}
    policies(authz("allow-ops", other), authz("allow-demo", by_namespace))
    wait_until(lambda: client_call(lab), "a namespace ALLOW to admit the client")


def test_plaintext_has_no_identity(lab: Lab, policies: Callable[..., None]) -> None:
    """A PERMISSIVE server takes plaintext; an ALLOW on namespaces then refuses it (no
    identity) while the mTLS client from that namespace still gets through."""
    permissive = {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "server-permissive", "namespace": "demo"},
        "spec": {"selector": {"matchLabels": {"app": "server"}}, "mtls": {"mode": "PERMISSIVE"}},
    }
    policies(permissive)
    wait_until(lambda: legacy_call(lab), "plaintext to reach the PERMISSIVE server")

    by_namespace = {"rules": [{"from": [{"source": {"namespaces": ["demo", "legacy"]}}]}]}
    policies(permissive, authz("allow-namespaces", by_namespace))
    wait_until(lambda: not legacy_call(lab), "the namespace ALLOW to refuse plaintext")
    assert client_call(lab)
    assert ztunnel_log_has(lab, "inbound_plaintext denied", "response_flags=DENY")


def test_open_connection_closed_when_a_policy_denies_it(
    lab: Lab, policies: Callable[..., None]
) -> None:
    """As Istio's ztunnel: a policy update re-checks open connections and closes the
    denied ones. The client holds one TCP connection to the Service and waits for EOF."""
    hold = (  # connect and send nothing: the app waits for a request, the tunnel stays open
        "import socket\n"
        "s = socket.create_connection(('server', 80), timeout=5)\n"
        "s.settimeout(60)\n"
        "print('connected', flush=True)\n"
        "while s.recv(65536): pass\n"
        "print('closed', flush=True)\n"
    )
    proc = lab.spawn_in_pod("demo/client", [sys.executable, "-c", hold], capture=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"connected\n"
        wait_until(lambda: inbound_live(lab), "the held connection to reach the server's ztunnel")
        assert proc.poll() is None, "the connection ended before any policy"
        deny = {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]}
        policies(authz("deny-demo", deny))
        out, _ = proc.communicate(timeout=WAIT_SECONDS)
        assert b"closed" in out
        assert ztunnel_log_has(lab, "inbound closed", "policy=demo/deny-demo")
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the open connection was not closed: {exc}") from None
    finally:
        proc.kill()
        proc.wait()
