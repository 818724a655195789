"""The stand-in API server with the controller's kinds, and a kubeconfig pointing at it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import yaml

from controller.sources.kubernetes import KINDS
from controller.sources.kubernetes_api import KubeApi
from tests.kube_standin.server import CONTROLLER_TOKEN, StandinApi

CLUSTER_SCOPED = ("Namespace", "Node")


def register(server: StandinApi, skip: Iterable[str] = ()) -> None:
    """Every kind the controller watches, at its preferred apiVersion, but ``skip``
    (plurals: CRDs that are then not installed)."""
    for kind in KINDS:
        if kind.plural not in skip:
            server.add_kind(
                kind.kind,
                kind.api_versions[0],
                kind.plural,
                namespaced=kind.kind not in CLUSTER_SCOPED,
                crd=kind.optional,
            )


def write_kubeconfig(path: Path, url: str, token: str = CONTROLLER_TOKEN) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {"server": url}}],
        "users": [{"name": "controller", "user": {"token": token}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "controller"}}],
        "current-context": "standin",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@asynccontextmanager
async def standin(
    tmp_path: Path, skip: Iterable[str] = ()
) -> AsyncIterator[tuple[StandinApi, KubeApi]]:
    """A running stand-in with the controller's kinds, and a client connected to it through
    a kubeconfig (kubernetes-asyncio's own loader)."""
    server = StandinApi()
    register(server, skip)
    url = await server.start()
    api = await KubeApi.connect(write_kubeconfig(tmp_path / "kubeconfig", url))
    try:
        yield server, api
    finally:
        await api.close()
        await server.stop()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
