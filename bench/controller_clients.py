"""``python -m bench.controller_clients``: many simulated nodes on one event loop.

Each node is its own gRPC channel (its own TLS connection) and its own
``Discovery.Stream``, authenticated with its own join token; it ACKs every version it
receives. What a real node does with a version (:mod:`mesh.push_client` applies it) is
not what the bench measures, so a response is not parsed: :func:`peek` reads its version
and counts its resources straight off the wire, which keeps 1000 nodes light enough to
share a 2-CPU machine with the controller.

Protocol with the bench (bench/controller_scale.py): node names and tokens come as
``NODE TOKEN`` lines on stdin, then an empty line; one JSON line per answered version on
stdout (``{"node", "version", "full", "resources", "removed", "received", "acked"}``, times
from ``time.monotonic()``, which is the same clock in every process of the machine).
Further stdin lines ``slow NODE SECONDS`` make a node delay its ACKs; EOF ends the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from mesh.api import mesh_pb2
from mesh.keepalive import KEEPALIVE

METHOD = "/ambimesh.v1.Discovery/Stream"
RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Peek:
    version: str
    full: bool
    resources: int
    removed: int


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def peek(data: bytes) -> Peek:
    """A serialized ``DiscoveryResponse``'s version, ``full`` and how many resources and
    removed keys it carries, walking its top-level fields only."""
    version, full, resources, removed = "", False, 0, 0
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            if field == 2:
                full = bool(value)
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError(f"field {field}: {length} bytes, past the end")
            if field == 1:
                version = data[pos : pos + length].decode()
            resources += field == 3
            removed += field == 4
            pos += length
        else:
            raise ValueError(f"field {field}: unexpected wire type {wire}")
    return Peek(version, full, resources, removed)


class Reports:
    """The JSON lines to the bench, written by a thread of their own: a write to a full
    pipe (1000 ACKs are 150 KB) must block that thread, not the nodes' event loop, or the
    bench's own reading would delay the ACKs it measures."""

    def __init__(self) -> None:
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._writer.start()

    def emit(self, node: str, seen: Peek, received: float, acked: float) -> None:
        line = {
            "node": node,
            "version": seen.version,
            "full": seen.full,
            "resources": seen.resources,
            "removed": seen.removed,
            "received": received,
            "acked": acked,
        }
        self._lines.put(json.dumps(line) + "\n")

    def _write(self) -> None:
        while (line := self._lines.get()) is not None:
            sys.stdout.write(line)
            if self._lines.empty():
                sys.stdout.flush()

    def close(self) -> None:
        self._lines.put(None)
        self._writer.join()
        sys.stdout.flush()


class Node:
    """One simulated node: connects, ACKs each version (after ``delay`` seconds), and
    reconnects after an error (logged to stderr) until stopped."""

    def __init__(
        self,
        name: str,
        token: str,
        target: str,
        credentials: grpc.ChannelCredentials,
        reports: Reports,
    ) -> None:
        self.name = name
        self._reports = reports
        self.delay = 0.0
        self._token = token
        self._target = target
        self._credentials = credentials

    async def run(self) -> None:
        while True:
            try:
                await self._stream()
            except grpc.aio.AioRpcError as e:
                print(f"{self.name}: {e.code().name}: {e.details()}", file=sys.stderr)
            await asyncio.sleep(RETRY_SECONDS)

    async def _stream(self) -> None:
        # Its own subchannel: gRPC would otherwise share one connection among channels
        # with the same target and arguments, and the controller would see one node.
        options = [*KEEPALIVE.client_options(), ("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.secure_channel(self._target, self._credentials, options) as channel:
            stream = channel.stream_stream(
                METHOD,
                request_serializer=mesh_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=bytes,
            )
            call = stream(metadata=(("authorization", f"Bearer {self._token}"),))
            await call.write(mesh_pb2.DiscoveryRequest(node=self.name))
            while isinstance(data := await call.read(), bytes):
                received = time.monotonic()
                seen = peek(data)
                if self.delay:
                    await asyncio.sleep(self.delay)
                await call.write(mesh_pb2.DiscoveryRequest(node=self.name, version=seen.version))
                self._reports.emit(self.name, seen, received, time.monotonic())


async def _commands(nodes: dict[str, Node]) -> None:
    """Stdin: ``slow NODE SECONDS`` lines until EOF."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        match line.split():
            case ["slow", name, seconds] if name in nodes:
                nodes[name].delay = float(seconds)
            case _:
                print(f"unknown command: {line.strip()!r}", file=sys.stderr)


async def run(target: str, root_pem: bytes, tokens: dict[str, str]) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=root_pem)
    reports = Reports()
    nodes = {n: Node(n, token, target, credentials, reports) for n, token in tokens.items()}
    tasks = [asyncio.create_task(node.run()) for node in nodes.values()]
    try:
        await _commands(nodes)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        reports.close()


def read_tokens() -> dict[str, str]:
    tokens: dict[str, str] = {}
    while (line := sys.stdin.readline().strip()) != "":
        node, token = line.split()
        tokens[node] = token
    return tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.controller_clients", description=__doc__)
    p.add_argument("--target", required=True, help="the controller's HOST:PORT")
    p.add_argument("--root-cert", type=Path, required=True, help="the controller's root CA")
    args = p.parse_args(argv)
    asyncio.run(run(args.target, args.root_cert.read_bytes(), read_tokens()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
