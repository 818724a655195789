"""Node authentication on Kubernetes: a projected service-account token, checked by the
API server (TokenReview, ``authentication.k8s.io/v1``).

The node's ztunnel (and a waypoint) sends the token the kubelet projects into its pod for
our audience. The API server says whether it is valid, for which audience, and whose it
is: a bound token names its service account (``system:serviceaccount:NS:SA``) and, in
``status.user.extra``, the pod it is bound to (``authentication.kubernetes.io/pod-name``,
``pod-uid``) and, on recent clusters, that pod's node (``node-name``). Where the node is
not given we read the pod's ``spec.nodeName``. The token dies with the pod, so a deleted
ztunnel's token cannot be replayed.

Only the service accounts in ``node_accounts`` (the node DaemonSet's) act for their node,
with every identity of the pods on it; any other pod with a token for our audience (a
waypoint) is held to its own identity (:class:`controller.auth.Caller`). Results are
cached for :data:`CACHE_SECONDS`, so a ztunnel asking for many certificates costs one
review, and a deleted pod's token stops working within that time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import aiohttp

from controller.auth import AuthError, Caller, Metadata, bearer
from controller.quoting import clip, quote
from controller.sources.kubernetes_api import ApiError, JsonObject, KubeApi

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
NODE_NAME = "authentication.kubernetes.io/node-name"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
DEFAULT_AUDIENCE = "ambimesh"
DEFAULT_NODE_ACCOUNTS = ("ambimesh-system/ambimesh-node",)
CACHE_SECONDS = 30.0
CACHE_ENTRIES = 4096
MESSAGE_LIMIT = 300


class TokenReviewAuthenticator:
    def __init__(
        self,
        api: KubeApi,
        audience: str = DEFAULT_AUDIENCE,
        node_accounts: Collection[str] = DEFAULT_NODE_ACCOUNTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._audience = audience
        self._node_accounts = frozenset(node_accounts)
        self._clock = clock
        self._cache: dict[bytes, tuple[float, Caller]] = {}

    async def authenticate(self, metadata: Metadata) -> Caller:
        token = bearer(metadata)
        digest = hashlib.sha256(token).digest()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        caller = await self._review(token.decode("ascii", "replace"))
        self._remember(digest, caller)
        return caller

    async def _review(self, token: str) -> Caller:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self._audience]},
        }
        status = (await self._call(self._api.post(TOKEN_REVIEWS, body))).get("status") or {}
        if not status.get("authenticated"):
            # The API server's reason, bounded (it may quote the token's audiences).
            problem = str(status.get("error") or "not authenticated")[:MESSAGE_LIMIT]
            raise AuthError(f"the API server refused the token: {problem}")
        if self._audience not in (status.get("audiences") or ()):
            raise AuthError(f"the token is not for audience {quote(self._audience)}")
        user = status.get("user") or {}
        username = str(user.get("username", ""))
        if not username.startswith(SERVICE_ACCOUNT_PREFIX) or username.count(":") != 3:
            raise AuthError(f"{quote(username)} is not a service account")
        namespace, account = username.removeprefix(SERVICE_ACCOUNT_PREFIX).split(":")
        extra = user.get("extra") or {}
        pod = _single(extra, POD_NAME)
        if not pod:
            raise AuthError(
                "not a pod-bound token: mount a projected serviceAccountToken with audience "
                f"{quote(self._audience)}"
            )
        node = _single(extra, NODE_NAME) or await self._node_of(namespace, pod, extra)
        own = None if f"{namespace}/{account}" in self._node_accounts else (namespace, account)
        return Caller(node, own)

    async def _node_of(self, namespace: str, name: str, extra: Any) -> str:
        """The node the token's pod runs on (older clusters put only the pod in the token)."""
        pod = await self._call(self._api.get(f"/api/v1/namespaces/{namespace}/pods/{name}"))
        metadata, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        uid = _single(extra, POD_UID)
        if uid and metadata.get("uid") != uid:
            raise AuthError(f"pod {namespace}/{clip(name)} was replaced since the token was made")
        node = spec.get("nodeName")
        if not isinstance(node, str) or not node:
            raise AuthError(f"pod {namespace}/{clip(name)} is not scheduled on a node")
        return node

    async def _call(self, request: Awaitable[JsonObject]) -> JsonObject:
        try:
            return await request
        except ApiError as e:
            raise AuthError(f"cannot check the token with the API server: {e}") from None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise AuthError(f"cannot reach the API server to check the token: {e}") from None

    def _remember(self, digest: bytes, caller: Caller) -> None:
        now = self._clock()
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache = {d: e for d, e in self._cache.items() if e[0] > now}
            while len(self._cache) >= CACHE_ENTRIES:
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = (now + CACHE_SECONDS, caller)


def _single(extra: Any, key: str) -> str:
    """The one value of ``extra[key]`` (TokenReview extras are lists of strings)."""
    values = extra.get(key) if isinstance(extra, dict) else None
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return ""
