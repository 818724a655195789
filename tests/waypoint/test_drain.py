"""A waypoint told to stop (SIGTERM) drains: a keep-alive HTTP/1.1 tunnel gets its answer
with `Connection: close`, new tunnels are refused unprocessed (REFUSED_STREAM, so the
ztunnel retries elsewhere), and the drain ends as soon as the last tunnel does."""

from __future__ import annotations

import asyncio

import pytest

from mesh.hbone.connection import HboneStreamReset
from tests.waypoint.rig import TIMEOUT, Rig

pytestmark = pytest.mark.asyncio


async def test_drain_closes_keep_alive_refuses_new_tunnels_and_ends_with_the_last() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        first = await client.request("GET", "/before")
        assert first.status == 200 and first.headers.get("connection") != "close"
        drained = asyncio.create_task(rig.waypoint.drain(TIMEOUT * 4, asyncio.Event()))
        await asyncio.sleep(0.05)
        assert not drained.done(), "the drain ended while a tunnel was still being served"

        last = await client.request("GET", "/during")
        assert last.status == 200
        assert last.headers.get("connection") == "close"
        with pytest.raises(HboneStreamReset) as refused:
            await rig.tunnel()
        assert refused.value.refused

        client.stream.write_eof()
        await asyncio.wait_for(drained, TIMEOUT)
        assert rig.waypoint.inbound.live == 0


async def test_drain_stops_at_its_deadline() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        assert (await client.request("GET", "/idle-after")).status == 200
        await asyncio.wait_for(rig.waypoint.drain(0.3, asyncio.Event()), TIMEOUT)
        assert rig.waypoint.inbound.live == 1  # left for close() to end
