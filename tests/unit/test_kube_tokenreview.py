"""Node authentication on Kubernetes: projected service-account tokens checked with a
TokenReview against the stand-in API server, end to end through the controller's CA over
real gRPC: a node gets only identities of pods scheduled on it, a waypoint only its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from controller.auth import AuthError, Caller, JoinTokensFirst, TokenAuthenticator
from controller.ca import ROOT_CERT_FILE, CertificateAuthority
from controller.main import grpc_server
from controller.sources.kubernetes_api import KubeApi
from controller.store import Store
from controller.tokenreview import NODE_NAME, POD_NAME, POD_UID, TokenReviewAuthenticator
from controller.translate import SourcedObject, translate
from mesh.cert_client import CertificateError, request_certificate
from mesh.csr import make_key_and_csr
from mesh.spiffe import SpiffeId
from tests.kube_standin import objects as k
from tests.kube_standin.cluster import standin
from tests.kube_standin.server import StandinApi, TokenInfo

NODE_SA = "system:serviceaccount:ambimesh-system:ambimesh-node"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
JOIN_TOKEN = "join-token-for-vm-1-0123456789"


def metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


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


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[StandinApi, KubeApi]]:
    async with standin(tmp_path) as (server, api):
        seed(server)
        yield server, api


async def test_a_node_token_names_its_node_from_the_pods_spec(
    cluster: tuple[StandinApi, KubeApi],
) -> None:
    server, api = cluster
    auth = TokenReviewAuthenticator(api)
    assert await auth.authenticate(metadata("token-node-1")) == Caller("node-1")
    review = server.token_reviews[-1]
    assert review["apiVersion"] == "authentication.k8s.io/v1" and review["kind"] == "TokenReview"
    assert review["spec"] == {"token": "token-node-1", "audiences": ["ambimesh"]}
    assert ("GET", "/api/v1/namespaces/ambimesh-system/pods/ambimesh-node-aaaaa", {}) in (
        server.requests
    )
    # Cached: a ztunnel asking for many certificates costs one review.
    assert await auth.authenticate(metadata("token-node-1")) == Caller("node-1")
    assert len(server.token_reviews) == 1
    # A token that carries its node needs no pod lookup.
    lookups = len(server.requests)
    assert await auth.authenticate(metadata("token-node-2-new")) == Caller("node-2")
    assert len(server.requests) == lookups + 1


async def test_a_waypoint_is_held_to_its_own_identity(
    cluster: tuple[StandinApi, KubeApi],
) -> None:
    _, api = cluster
    caller = await TokenReviewAuthenticator(api).authenticate(metadata("token-waypoint"))
    assert caller == Caller("node-1", ("demo", "waypoint"))


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("not-a-token", "the API server refused the token: [invalid bearer token"),
        ("token-default-audience", "is invalid for the target audiences"),
        ("token-replaced", "was replaced since the token was made"),
        ("token-legacy", "not a pod-bound token"),
    ],
)
async def test_refused_tokens(
    cluster: tuple[StandinApi, KubeApi], token: str, problem: str
) -> None:
    _, api = cluster
    auth = TokenReviewAuthenticator(api)
    with pytest.raises(AuthError, match=problem.replace("[", r"\[")):
        await auth.authenticate(metadata(token))
    with pytest.raises(AuthError):  # refusals are not cached
        await auth.authenticate(metadata(token))


async def test_an_unreachable_api_server_refuses_with_a_reason(tmp_path: Path) -> None:
    async with standin(tmp_path) as (server, api):
        server.fail_next(1, 503)
        with pytest.raises(AuthError, match="cannot check the token with the API server: HTTP 503"):
            await TokenReviewAuthenticator(api).authenticate(metadata("token-node-1"))


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


@pytest.fixture
async def ca(cluster: tuple[StandinApi, KubeApi], tmp_path: Path) -> AsyncIterator[CA]:
    """The controller's gRPC CA with join tokens first, then TokenReview, and the cluster's
    pods translated into its store."""
    server, api = cluster
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"vm-1: {JOIN_TOKEN}\n")
    tokens.chmod(0o600)
    authority = CertificateAuthority.load_or_create(tmp_path / "state", "cluster.local")
    store = Store()
    cluster_objects = [obj for coll in server.collections.values() for obj in coll.objects.values()]
    store.replace(translate([SourcedObject(o, "kubernetes") for o in cluster_objects]))
    auth = JoinTokensFirst(TokenAuthenticator(tokens), TokenReviewAuthenticator(api))
    grpc_srv = grpc_server(store, auth, authority)
    serving = authority.serving_cert(["127.0.0.1"])
    credentials = grpc.ssl_server_credentials([(serving.key_pem, serving.chain_pem)])
    port = grpc_srv.add_secure_port("127.0.0.1:0", credentials)
    await grpc_srv.start()
    try:
        yield CA(f"127.0.0.1:{port}", (tmp_path / "state" / ROOT_CERT_FILE).read_bytes())
    finally:
        await grpc_srv.stop(0)


async def test_a_node_obtains_only_identities_of_its_own_pods(
    ca: CA, cluster: tuple[StandinApi, KubeApi]
) -> None:
    server, _ = cluster
    assert await ca.request("token-node-1", "demo", "web") == "issued"
    assert await ca.request("token-node-1", "demo", "db") == "PERMISSION_DENIED"  # on node-2
    assert await ca.request("token-node-2", "demo", "db") == "issued"
    assert await ca.request("token-waypoint", "demo", "waypoint") == "issued"
    assert await ca.request("token-waypoint", "demo", "web") == "PERMISSION_DENIED"
    assert await ca.request("not-a-token", "demo", "web") == "UNAUTHENTICATED"
    assert await ca.request("token-default-audience", "demo", "web") == "UNAUTHENTICATED"
    # A host outside the cluster joins with a join token; no TokenReview is made for it.
    reviews = len(server.token_reviews)
    assert await ca.request(JOIN_TOKEN, "demo", "web") == "PERMISSION_DENIED"  # no pods there
    assert len(server.token_reviews) == reviews
