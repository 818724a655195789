"""What an open HBONE stream keeps for its life: no future on either end (the client's
wait for the answer is dropped once open_stream returned), and the server's handler task
is forgotten when it ends."""

from __future__ import annotations

import asyncio

import pytest

from mesh.hbone.connection import HboneStream
from mesh.hbone.protocol import ConnectRequest
from mesh.spiffe import SpiffeId
from tests.unit.hbone_rig import TIMEOUT, Pki, dial, make_pki, read_all, running_server


@pytest.fixture(scope="module")
def pki() -> Pki:
    return make_pki()


def _futures_of(stream: HboneStream) -> list[object]:
    return [v for v in vars(stream).values() if isinstance(v, asyncio.Future)]


async def test_open_streams_hold_no_future_and_handlers_are_forgotten(pki: Pki) -> None:
    served: list[HboneStream] = []
    release = asyncio.Event()

    async def hold(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        await stream.accept()
        served.append(stream)
        await release.wait()
        stream.write(b"bye")
        stream.write_eof()
        await stream.drain()

    async with running_server(pki.server, hold) as srv:
        conn = await dial(srv, pki.client)
        stream = await conn.open_stream("10.0.0.1:80")
        async with asyncio.timeout(TIMEOUT):
            while not served:
                await asyncio.sleep(0.01)
        assert _futures_of(stream) == []
        assert _futures_of(served[0]) == []
        release.set()
        stream.write_eof()
        assert await read_all(stream) == b"bye"
        protocol = srv.protocols[0]
        async with asyncio.timeout(TIMEOUT):
            while protocol._tasks:
                await asyncio.sleep(0.01)
        conn.close()
