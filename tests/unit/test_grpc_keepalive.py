"""Keepalive between the real controller gRPC server and the real PushClient, in-process,
with the shared settings scaled down to a one-second ping: an idle push stream lives on,
a silent dead link is noticed by both ends, and a server that disagrees would cut the
stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.auth import TokenAuthenticator
from controller.ca import ROOT_CERT_FILE, CertificateAuthority
from controller.main import grpc_server
from controller.push_service import DiscoveryService
from controller.store import Store
from mesh.keepalive import Keepalive
from mesh.push_client import PushClient

FAST = Keepalive(time_ms=1000, timeout_ms=2000)
TOKEN = "token-a-0123456789"


class Relay:
    """A TCP relay to the controller that can go silent: a link that died without a FIN."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self.accepted = 0
        self.silent = False
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.silent:
                    writer.write(data)
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


class Harness:
    """A controller gRPC server with a given keepalive, and one FAST node behind a relay."""

    def __init__(self, tmp_path: Path) -> None:
        self._tokens = tmp_path / "tokens.yaml"
        self._tokens.write_text(f"node-a: {TOKEN}\n")
        self._tokens.chmod(0o600)
        self._ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
        self._root = (tmp_path / ROOT_CERT_FILE).read_bytes()
        self._servers: list[grpc.aio.Server] = []
        self._nodes: list[tuple[PushClient, Relay]] = []
        self.discovery: DiscoveryService | None = None

    async def start(
        self, server_keepalive: Keepalive, client_keepalive: Keepalive = FAST
    ) -> tuple[PushClient, Relay]:
        store, authenticator = Store(), TokenAuthenticator(self._tokens)
        self.discovery = DiscoveryService(store, authenticator)
        server = grpc_server(store, authenticator, self._ca, server_keepalive, self.discovery)
        serving = self._ca.serving_cert(["127.0.0.1"])
        credentials = grpc.ssl_server_credentials([(serving.key_pem, serving.chain_pem)])
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        self._servers.append(server)
        relay = Relay(port)
        client = PushClient(
            f"127.0.0.1:{await relay.start()}",
            self._root,
            TOKEN,
            "node-a",
            lambda version, state: None,
            initial_backoff=0.1,
            keepalive=client_keepalive,
        )
        self._nodes.append((client, relay))
        client.start()
        assert await asyncio.to_thread(client.wait_synced, 10)
        return client, relay

    async def stop(self) -> None:
        for client, relay in self._nodes:
            await asyncio.to_thread(client.stop, 5)
            relay.close()
        for server in self._servers:
            await server.stop(0)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    running = Harness(tmp_path)
    try:
        yield running
    finally:
        await running.stop()


async def test_idle_stream_survives_and_a_dead_link_is_noticed(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mesh.push_client")
    client, relay = await harness.start(FAST)
    await asyncio.sleep(5 * FAST.time_ms / 1000)
    assert relay.accepted == 1, f"the idle stream was torn down:\n{caplog.text}"
    assert "ping" not in caplog.text.lower()

    # Still pinging after five idle periods: a link gone silent is given up on in time.
    relay.silent = True
    started = time.monotonic()
    limit = (FAST.time_ms + FAST.timeout_ms) / 1000 + 3
    while relay.accepted == 1 and time.monotonic() - started < limit:
        await asyncio.sleep(0.05)
    assert relay.accepted == 2, f"a dead link went unnoticed for {limit} s"
    assert client.version == "0"


async def test_a_server_allowing_fewer_pings_cuts_the_stream(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """What happened when the two ends' numbers drifted apart (and why they live in one place)."""
    caplog.set_level(logging.WARNING, logger="mesh.push_client")
    _, relay = await harness.start(Keepalive(time_ms=600_000))
    started = time.monotonic()
    while relay.accepted == 1 and time.monotonic() - started < 10:
        await asyncio.sleep(0.05)
    assert relay.accepted == 2
    assert "too many pings" in caplog.text.lower()


async def test_the_controller_notices_a_node_gone_silent(harness: Harness) -> None:
    """A node whose host vanished (or whose process stopped) without a FIN: the server's own
    pings end its stream, here with the node pinging too rarely to notice anything."""
    _, relay = await harness.start(FAST, client_keepalive=Keepalive(time_ms=600_000))
    assert harness.discovery is not None
    status = harness.discovery.nodes["node-a"]
    assert status.connected == 1
    relay.silent = True
    started = time.monotonic()
    limit = (FAST.time_ms + FAST.timeout_ms) / 1000 + 3
    while status.connected and time.monotonic() - started < limit:
        await asyncio.sleep(0.05)
    assert status.connected == 0, f"the controller kept a silent node's stream for {limit} s"
    assert relay.accepted == 1  # the node itself noticed nothing
