"""``ambimesh-controller --source kubernetes`` against the stand-in API server: it serves
nothing until the cluster's configuration is valid (an empty snapshot would have every
node drop its pods), then issues certificates to nodes proving themselves by TokenReview."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest

from controller.ca import ROOT_CERT_FILE
from controller.main import parse_args, serve
from tests.kube_standin import objects as k
from tests.kube_standin.cluster import standin, until, write_kubeconfig
from tests.kube_standin.tokens import CA, seed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_files_source_still_needs_its_directory_and_tokens() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--source", "files", "--tokens", "t.yaml"])
    args = parse_args(["--source", "kubernetes", "--kubeconfig", "kc"])
    assert args.tokens is None and args.node_service_accounts == ["ambimesh-system/ambimesh-node"]


async def test_serves_only_a_valid_cluster_configuration(tmp_path: Path) -> None:
    async with standin(tmp_path) as (server, _):
        seed(server)
        server.put(k.namespace("demo", {"ambimesh.io/dataplane-mode": "sideways"}))
        port = free_port()
        args = parse_args(
            [
                "--source",
                "kubernetes",
                "--kubeconfig",
                str(write_kubeconfig(tmp_path / "controller.kubeconfig", server.url)),
                "--state-dir",
                str(tmp_path / "state"),
                "--listen",
                f"127.0.0.1:{port}",
                "--serving-hosts",
                "127.0.0.1",
            ]
        )
        controller = asyncio.create_task(serve(args))
        try:
            await until(lambda: any(w.plural == "pods" for w in server.watches))
            await asyncio.sleep(0.5)  # translated (and rejected) by now
            assert not listening(port) and not controller.done()
            server.put(k.namespace("demo", k.AMBIENT))
            await until(lambda: listening(port))
            ca = CA(f"127.0.0.1:{port}", (tmp_path / "state" / ROOT_CERT_FILE).read_bytes())
            assert await ca.request("token-node-1", "demo", "web") == "issued"
            assert await ca.request("token-node-1", "demo", "db") == "PERMISSION_DENIED"
        finally:
            controller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await controller
