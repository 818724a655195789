"""The replay buffer retries and mirrors depend on, and the state the request path reads."""

from __future__ import annotations

import pytest

from mesh.api import mesh_pb2
from mesh.spiffe import identity_of
from tests.waypoint.rig import HOST, base_resources, routes
from waypoint.headers import Headers
from waypoint.message import BytesBody, ReplayableBody
from waypoint.state import WaypointState


class Chunks:
    def __init__(self, *chunks: bytes) -> None:
        self._chunks = list(chunks)
        self.reads = 0

    @property
    def length(self) -> int | None:
        return None

    async def read(self) -> bytes:
        self.reads += 1
        return self._chunks.pop(0) if self._chunks else b""

    @property
    def trailers(self) -> Headers:
        return [("t", "1")]

    def close(self) -> None:
        pass


async def read_all(body: object) -> bytes:
    out = b""
    while chunk := await body.read():  # type: ignore[attr-defined]
        out += chunk
    return out


@pytest.mark.asyncio
async def test_a_second_reader_replays_what_the_first_read_then_continues() -> None:
    source = Chunks(b"ab", b"cd", b"ef")
    replay = ReplayableBody(source, limit=100)
    first = replay.reader()
    assert await first.read() == b"ab"  # the first attempt fails after one chunk
    second = replay.reader()
    assert await read_all(second) == b"abcdef"
    assert await replay.complete is True
    assert replay.recorded() == b"abcdef"
    assert second.trailers == [("t", "1")]
    assert source.reads == 4  # every source byte was read once


@pytest.mark.asyncio
async def test_a_body_over_the_limit_streams_once_and_is_not_replayable() -> None:
    replay = ReplayableBody(Chunks(b"x" * 60, b"y" * 60), limit=100)
    assert await read_all(replay.reader()) == b"x" * 60 + b"y" * 60
    assert not replay.replayable
    assert await replay.complete is False
    with pytest.raises(RuntimeError):
        replay.reader()


@pytest.mark.asyncio
async def test_closing_before_the_end_settles_mirrors_waiting_for_it() -> None:
    replay = ReplayableBody(BytesBody(b"abc"))
    replay.close()
    assert await replay.complete is False


def test_state_indexes_routes_endpoints_and_sources() -> None:
    resources = base_resources()
    table = routes(port=80)
    resources[table.key] = table
    state = WaypointState.build("7", resources)
    service = state.services_by_vip["10.96.0.10"]
    assert state.services_by_host[HOST] is service
    assert state.route_table(HOST, 80) is not None
    assert state.route_table(HOST, 81) is None
    assert [w.name for w in state.endpoints(service, {"version": "v2"})] == ["reviews-v2"]
    assert len(state.endpoints(service)) == 2
    sleep = state.by_address["127.0.0.1"]
    assert state.source_workload("127.0.0.1", identity_of(sleep)) is sleep
    other = mesh_pb2.Workload(namespace="evil", service_account="x")
    assert state.source_workload("127.0.0.1", identity_of(other)) is None
