"""Node authentication on Kubernetes: projected service-account tokens checked with a
TokenReview against the stand-in API server, end to end through the controller's CA over
real gRPC: a node gets only identities of pods scheduled on it, a waypoint only its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.auth import AuthError, Caller, JoinTokensFirst, TokenAuthenticator
from controller.ca import ROOT_CERT_FILE, CertificateAuthority
from controller.main import grpc_server
from controller.sources.kubernetes_api import KubeApi
from controller.store import Store
from controller.tokenreview import TokenReviewAuthenticator
from controller.translate import SourcedObject, translate
from tests.kube_standin.cluster import standin
from tests.kube_standin.server import StandinApi
from tests.kube_standin.tokens import CA, JOIN_TOKEN, seed


def metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


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
