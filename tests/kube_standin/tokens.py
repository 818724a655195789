"""A cluster for node-authentication tests: node-agent, app and waypoint pods on two
nodes, the projected tokens the kubelet would have given them, and a CA client."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from controller.tokenreview import NODE_NAME, POD_NAME, POD_UID
from mesh.cert_client import CertificateError, request_certificate
from mesh.csr import make_key_and_csr
from mesh.spiffe import SpiffeId
from tests.kube_standin import objects as k
from tests.kube_standin.server import StandinApi, TokenInfo

NODE_SA = "system:serviceaccount:ambimesh-system:ambimesh-node"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
JOIN_TOKEN = "join-token-for-vm-1-0123456789"


def seed(server: StandinApi) -> None:
    """A ztunnel pod on each node, app pods web (node-1) and db (node-2), a waypoint pod
    (node-1), and the tokens the kubelet would have projected into them."""
    server.put(k.namespace("demo", k.AMBIENT))
    pods = {
        "node-1": server.put(k.pod("ambimesh-system", "ambimesh-node-aaaaa", "10.1.0.1")),
        "node-2": server.put(
            k.pod("ambimesh-system", "ambimesh-node-bbbbb", "10.2.0.1", node_name="node-2")
        ),
    }
    server.put(k.pod("demo", "web", "10.1.0.2", service_account="web"))
    server.put(k.pod("demo", "db", "10.2.0.2", node_name="node-2", service_account="db"))
    waypoint = server.put(k.pod("demo", "waypoint", "10.1.0.3", service_account="waypoint"))
    for node, pod in pods.items():
        # Before Kubernetes 1.30 a bound token names its pod, not its node.
        server.tokens[f"token-{node}"] = TokenInfo(
            NODE_SA,
            ["ambimesh"],
            {POD_NAME: [pod["metadata"]["name"]], POD_UID: [pod["metadata"]["uid"]]},
        )
    server.tokens["token-node-2-new"] = TokenInfo(
        NODE_SA, ["ambimesh"], {POD_NAME: ["ambimesh-node-bbbbb"], NODE_NAME: ["node-2"]}
    )
    server.tokens["token-default-audience"] = TokenInfo(
        NODE_SA, [API_AUDIENCE], {POD_NAME: ["ambimesh-node-aaaaa"]}
    )
    server.tokens["token-waypoint"] = TokenInfo(
        "system:serviceaccount:demo:waypoint",
        ["ambimesh"],
        {POD_NAME: ["waypoint"], POD_UID: [waypoint["metadata"]["uid"]]},
    )
    server.tokens["token-replaced"] = TokenInfo(
        NODE_SA, ["ambimesh"], {POD_NAME: ["ambimesh-node-aaaaa"], POD_UID: ["an-old-uid"]}
    )
    server.tokens["token-legacy"] = TokenInfo(NODE_SA, ["ambimesh"], {})


@dataclass
class CA:
    target: str
    root_pem: bytes

    async def request(self, token: str, namespace: str, account: str) -> str:
        """ "issued", or the gRPC status name of the refusal."""
        _, csr = make_key_and_csr(SpiffeId("cluster.local", namespace, account))
        try:
            await asyncio.to_thread(request_certificate, self.target, self.root_pem, token, csr, 60)
        except CertificateError as e:
            assert e.code is not None
            return e.code.name
        return "issued"
