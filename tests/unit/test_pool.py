"""The HBONE connection pool: sharing, single-flight connects, replacement of dead connections."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from h2.errors import ErrorCodes

from mesh.hbone.connection import (
    HboneClientConnection,
    HboneConnectionClosed,
    HboneStream,
    HboneStreamReset,
)
from mesh.hbone.limits import HboneLimits
from mesh.hbone.protocol import ConnectRequest
from mesh.pool import HboneConnectionPool
from mesh.spiffe import SpiffeId
from tests.unit.hbone_rig import dial, echo, make_pki, read_all, running_server

TIMEOUT = 5.0


class FakeConnection:
    """Stands in for HboneClientConnection: the pool only uses this surface."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_usable = True
        self.active_streams = 0
        self.closed = False
        self.refuse_streams = False

    def close(self) -> None:
        self.closed = True
        self.is_usable = False

    async def open_stream(self, authority: str, extra_headers: object = ()) -> HboneStream:
        if self.refuse_streams:
            raise HboneConnectionClosed("GOAWAY")
        self.active_streams += 1
        return cast(HboneStream, (self.name, authority))


class Dialer:
    def __init__(self) -> None:
        self.made: list[FakeConnection] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False

    async def __call__(self) -> HboneClientConnection:
        await asyncio.wait_for(self.gate.wait(), TIMEOUT)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionRefusedError("nobody home")
        conn = FakeConnection(f"c{len(self.made)}")
        self.made.append(conn)
        return cast(HboneClientConnection, conn)


async def test_reuses_one_connection_per_key() -> None:
    pool: HboneConnectionPool[str] = HboneConnectionPool()
    dial = Dialer()
    a1, a2 = await pool.get("a", dial), await pool.get("a", dial)
    b = await pool.get("b", dial)
    assert a1 is a2 and a1 is not b
    assert len(dial.made) == 2 and len(pool) == 2


async def test_concurrent_callers_share_one_connect() -> None:
    pool: HboneConnectionPool[str] = HboneConnectionPool()
    dial = Dialer()
    dial.gate.clear()
    waiters = [asyncio.create_task(pool.get("a", dial)) for _ in range(10)]
    await asyncio.sleep(0.01)
    dial.gate.set()
    conns = await asyncio.wait_for(asyncio.gather(*waiters), TIMEOUT)
    assert len({id(c) for c in conns}) == 1
    assert len(dial.made) == 1


async def test_failure_is_shared_then_retried() -> None:
    pool: HboneConnectionPool[str] = HboneConnectionPool()
    dial = Dialer()
    dial.fail_next = True
    dial.gate.clear()
    waiters = [asyncio.create_task(pool.get("a", dial)) for _ in range(3)]
    await asyncio.sleep(0.01)
    dial.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    assert len(pool) == 0
    assert await pool.get("a", dial) is cast(HboneClientConnection, dial.made[0])


async def test_cancelled_caller_does_not_cancel_shared_connect() -> None:
    pool: HboneConnectionPool[str] = HboneConnectionPool()
    dial = Dialer()
    dial.gate.clear()
    impatient = asyncio.create_task(pool.get("a", dial))
    patient = asyncio.create_task(pool.get("a", dial))
    await asyncio.sleep(0.01)
    impatient.cancel()
    dial.gate.set()
    assert await asyncio.wait_for(patient, TIMEOUT) is cast(HboneClientConnection, dial.made[0])


async def test_dead_connection_is_replaced_and_busy_one_retired() -> None:
    pool: HboneConnectionPool[str] = HboneConnectionPool()
    dial = Dialer()
    first = await pool.get("a", dial)
    dial.made[0].active_streams = 2
    dial.made[0].is_usable = False  # e.g. GOAWAY received: streams finish, no new ones
    second = await pool.get("a", dial)
    assert second is not first
    assert not dial.made[0].closed  # still carrying streams
    dial.made[0].active_streams = 0
    await pool.get("a", dial)
    assert dial.made[0].closed
    pool.close()
    assert dial.made[1].closed


async def test_open_stream_retries_on_a_fresh_connection() -> None:
    pool: HboneConnectionPool[str] = HboneConnectionPool()
    dial = Dialer()
    await pool.get("a", dial)
    dial.made[0].refuse_streams = True
    stream = await pool.open_stream("a", dial, "10.0.0.1:80")
    assert stream == cast(HboneStream, ("c1", "10.0.0.1:80"))
    assert dial.made[0].closed


async def test_open_stream_gives_up_after_one_retry() -> None:
    pool: HboneConnectionPool[str] = HboneConnectionPool()
    dial = Dialer()

    async def always_goaway() -> HboneClientConnection:
        conn = await dial()
        cast(FakeConnection, conn).refuse_streams = True
        return conn

    with pytest.raises(HboneConnectionClosed):
        await pool.open_stream("a", always_goaway, "10.0.0.1:80")
    assert len(dial.made) == 2


async def test_idle_pooled_connection_is_closed_and_replaced() -> None:
    """Real mTLS: the client closes a pooled connection idle for `client_idle_timeout`
    (before the server's longer idle_timeout would), and the pool dials afresh."""
    pki = make_pki()
    limits = HboneLimits(client_idle_timeout=0.2)
    pool: HboneConnectionPool[str] = HboneConnectionPool()
    async with running_server(pki.server, echo) as srv:

        async def connect() -> HboneClientConnection:
            return await dial(srv, pki.client, limits=limits)

        stream = await pool.open_stream("a", connect, "10.0.0.7:80")
        first = await pool.get("a", connect)
        stream.write_eof()
        assert await read_all(stream) == b""
        await asyncio.wait_for(first.wait_closed(), TIMEOUT)
        second = await pool.get("a", connect)
        assert second is not first and second.is_usable
        pool.close()


async def test_refused_stream_is_retried_on_a_fresh_connection_other_resets_are_not() -> None:
    """Real mTLS: a draining peer answers RST_STREAM(REFUSED_STREAM) (RFC 9113 8.7: not
    processed, safe to retry); the pool dials again. Any other reset reaches the caller."""
    pki = make_pki()
    answers = [ErrorCodes.REFUSED_STREAM, None, ErrorCodes.CANCEL]

    async def handler(stream: HboneStream, request: ConnectRequest, peer: SpiffeId) -> None:
        code = answers.pop(0)
        if code is None:
            await echo(stream, request, peer)
        else:
            stream.reset(code)

    pool: HboneConnectionPool[str] = HboneConnectionPool()
    dialed: list[HboneClientConnection] = []
    async with running_server(pki.server, handler) as srv:

        async def connect() -> HboneClientConnection:
            dialed.append(await dial(srv, pki.client))
            return dialed[-1]

        stream = await pool.open_stream("a", connect, "10.0.0.7:80")
        assert len(dialed) == 2 and not dialed[0].is_usable
        stream.write(b"after the retry")
        stream.write_eof()
        assert await read_all(stream) == b"after the retry"
        with pytest.raises(HboneStreamReset) as reset:
            await pool.open_stream("a", connect, "10.0.0.7:80")
        assert not reset.value.refused
        assert len(dialed) == 2
        pool.close()
