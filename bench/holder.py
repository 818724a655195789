"""Idle connections for the memory benchmark, run as processes of lab pods.

``serve PORT``: an echo server. ``hold COUNT HOST:PORT...``: opens COUNT connections dealt
round-robin over the targets, proves each one through (one byte echoed), prints
``open COUNT`` and keeps them all open, silent, until stdin closes. Plain blocking
sockets: one process per pod, nothing to schedule.
"""

from __future__ import annotations

import asyncio
import socket
import sys

ECHO_TIMEOUT = 20.0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(4096):
        writer.write(data)
        await writer.drain()
    writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_echo, "0.0.0.0", port, backlog=4096)
    print(f"listening {port}", flush=True)
    await server.serve_forever()


def hold(count: int, targets: list[tuple[str, int]]) -> list[socket.socket]:
    conns = []
    for i in range(count):
        sock = socket.create_connection(targets[i % len(targets)], timeout=ECHO_TIMEOUT)
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise ConnectionError(f"connection {i} to {targets[i % len(targets)]} did not echo")
        conns.append(sock)
    return conns


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and len(argv) == 2:
        asyncio.run(serve(int(argv[1])))
        return 0
    if argv[:1] == ["hold"] and len(argv) >= 3:
        targets = [(host, int(port)) for host, _, port in (t.rpartition(":") for t in argv[2:])]
        conns = hold(int(argv[1]), targets)
        print(f"open {len(conns)}", flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin (or the pod goes)
        return 0
    print("usage: python -m bench.holder serve PORT | hold COUNT HOST:PORT...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
