"""The few raw Kubernetes API calls the controller makes, over kubernetes-asyncio.

kubernetes-asyncio (a maintained asyncio port of the official client) finds the cluster
the way kubectl does: in-cluster config (service-account token, which it re-reads as the
kubelet rotates it, and the cluster CA) or a kubeconfig (contexts, client certificates,
exec plugins). We take its configured, authenticated aiohttp session and ask for plain
JSON: translation reads Kubernetes objects as the dicts users write, and the typed models
would turn them into snake_case attributes and back (and know nothing of CRDs).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from controller.quoting import clip

JsonObject = dict[str, Any]
_JSON = {"Accept": "application/json", "Content-Type": "application/json"}
_AUTH = ["BearerToken"]
# A request other than a watch may take this long in all.
REQUEST_TIMEOUT = 30.0


class ApiError(Exception):
    """The API server answered with an error status (or an ERROR watch event)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class KubeApi:
    """One authenticated connection to the API server; :meth:`close` it when done."""

    def __init__(self, api_client: Any) -> None:
        self._client = api_client

    @classmethod
    async def connect(cls, kubeconfig: Path | None) -> KubeApi:
        """In-cluster config when ``kubeconfig`` is None and we run in a pod; else the
        kubeconfig (``kubeconfig``, or ``$KUBECONFIG`` / ``~/.kube/config`` as kubectl)."""
        configuration = client.Configuration()
        if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
            config.load_incluster_config(client_configuration=configuration)
        else:
            await config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None,
                client_configuration=configuration,
            )
        return cls(client.ApiClient(configuration))

    async def close(self) -> None:
        await self._client.close()

    async def get(self, path: str, query: Mapping[str, str] | None = None) -> JsonObject:
        response = await self._call("GET", path, query, None, REQUEST_TIMEOUT)
        return await _json_body(response)

    async def post(self, path: str, body: JsonObject) -> JsonObject:
        response = await self._call("POST", path, None, body, REQUEST_TIMEOUT)
        return await _json_body(response)

    async def watch(
        self, path: str, query: Mapping[str, str], read_timeout: float
    ) -> AsyncIterator[JsonObject]:
        """The watch events of ``path`` as they arrive (one JSON object per line); ends when
        the server ends the stream, raises when the connection breaks or stays silent for
        ``read_timeout`` seconds."""
        timeout = aiohttp.ClientTimeout(sock_connect=REQUEST_TIMEOUT, sock_read=read_timeout)
        response = await self._call("GET", path, {**query, "watch": "1"}, None, timeout)
        try:
            await _check(response)
            async for line in response.content:
                if line.strip():
                    yield _decode(line)
        finally:
            response.release()

    async def _call(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: JsonObject | None,
        timeout: float | aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        response: aiohttp.ClientResponse = await self._client.call_api(
            path,
            method,
            query_params=list((query or {}).items()),
            header_params=dict(_JSON),
            body=body,
            auth_settings=_AUTH,
            _preload_content=False,
            _request_timeout=timeout,
        )
        return response


async def _json_body(response: aiohttp.ClientResponse) -> JsonObject:
    try:
        await _check(response)
        return _decode(await response.read())
    finally:
        response.release()


async def _check(response: aiohttp.ClientResponse) -> None:
    """Raises :class:`ApiError` with the Status object's message for a non-2xx answer."""
    if 200 <= response.status < 300:
        return
    text = (await response.read()).decode("utf-8", "replace")
    try:
        status = json.loads(text)
        message = str(status.get("message") or status.get("reason") or text)
    except (ValueError, AttributeError):
        message = text
    raise ApiError(response.status, clip(message.strip() or response.reason or ""))


def _decode(data: bytes) -> JsonObject:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object from the API server, got {type(value).__name__}")
    return value
