"""HTTP/1.1 through a real waypoint on loopback (real mTLS and HBONE on both sides): the
default route, keep-alive on both sides, streaming bodies, 100-continue, upgrades, and
tunnels the waypoint must refuse."""

from __future__ import annotations

import asyncio

import pytest

from mesh.hbone.protocol import HboneStreamRefused
from tests.waypoint.rig import HOST, PORT, TIMEOUT, VIP, H1Client, Rig

pytestmark = pytest.mark.asyncio


async def test_default_route_reaches_both_endpoints_with_their_identity() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        pods = set()
        for i in range(20):
            response = await client.request("GET", f"/hello/{i}?q=1")
            assert response.status == 200
            body = response.json()
            assert body["path"] == f"/hello/{i}?q=1"
            assert body["headers"]["host"] == HOST  # type: ignore[index]
            pods.add(body["pod"])
        assert pods == {"reviews-v1", "reviews-v2"}


async def test_keep_alive_reuses_upstream_connections() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        for _ in range(30):
            assert (await client.request("GET", "/")).status == 200
        # One client tunnel, sequential requests: each pod needs one upstream tunnel.
        assert all(pod.tunnels == 1 for pod in rig.pods.values()), [
            p.tunnels for p in rig.pods.values()
        ]


async def test_post_body_and_head() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        response = await client.request("POST", "/upload", body=b"a" * 100_000)
        assert response.json()["body_bytes"] == 100_000
        head = await client.request("HEAD", "/bytes/1234")
        assert head.status == 200 and head.headers["content-length"] == "1234"
        assert head.body == b""
        after = await client.request("GET", "/after-head")
        assert after.json()["path"] == "/after-head"


async def test_chunked_request_streams_through_echo() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        stream = client.stream
        stream.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await stream.drain()
        # The upstream echoes as it receives: the first chunk comes back before the end.
        first = await asyncio.wait_for(stream.read(65536), TIMEOUT)
        while b"hello" not in first:
            first += await asyncio.wait_for(stream.read(65536), TIMEOUT)
        assert b"transfer-encoding: chunked" in first.lower()
        stream.write(b"6\r\n world\r\n0\r\n\r\n")
        await stream.drain()
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):
            rest += await asyncio.wait_for(stream.read(65536), TIMEOUT)
        assert b" world" in rest


async def test_expect_100_continue() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        stream = client.stream
        stream.write(
            b"PUT /put HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        await stream.drain()
        interim = await asyncio.wait_for(stream.read(65536), TIMEOUT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        stream.write(b"data")
        response = await client.response()
        assert response.status == 200
        assert response.json()["body_bytes"] == 4
        assert "expect" not in response.json()["headers"]  # type: ignore[operator]


async def test_websocket_upgrade_relays_bytes_after_101() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        stream = client.stream
        stream.write(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi"
        )
        await stream.drain()
        data = b""
        while b"HI" not in data:
            data += await asyncio.wait_for(stream.read(65536), TIMEOUT)
        assert data.startswith(b"HTTP/1.1 101 ")
        stream.write(b"more")
        await stream.drain()
        echoed = await asyncio.wait_for(stream.read(65536), TIMEOUT)
        assert echoed == b"MORE"


async def test_large_response_streams_with_bounded_memory() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        stream = client.stream
        size = 32 * 1024 * 1024
        stream.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await stream.drain()
        received = 0
        async with asyncio.timeout(60):
            while received < size:
                chunk = await stream.read(1 << 20)
                assert chunk
                received += len(chunk)
        assert received >= size


async def test_a_client_that_stops_reading_stops_the_endpoint() -> None:
    """Backpressure end to end: the waypoint holds no more than its windows and buffers
    of a 256 MiB response nobody reads."""
    async with Rig() as rig:
        client = await rig.h1()
        size = 256 * 1024 * 1024
        client.stream.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await client.stream.drain()
        await asyncio.wait_for(client.stream.read(1 << 20), TIMEOUT)
        await asyncio.sleep(1.5)  # the client reads nothing more
        sent = sum(pod.body_sent for pod in rig.pods.values())
        assert 0 < sent < 64 * 1024 * 1024, sent


async def test_an_endpoint_that_stops_reading_stops_the_client_upload() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        stream = client.stream
        size = 256 * 1024 * 1024
        stream.write(f"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b"u" * (1 << 20)
        written = 0
        async with asyncio.timeout(TIMEOUT):
            while written < size:
                stream.write(chunk)
                written += len(chunk)
                try:
                    await asyncio.wait_for(stream.drain(), 1.0)
                except TimeoutError:
                    break  # blocked: what we wrote is all the path between us can hold
        assert written < 64 * 1024 * 1024, written


async def test_tunnel_to_a_service_not_ours_is_refused() -> None:
    async with Rig() as rig:
        with pytest.raises(HboneStreamRefused) as refused:
            await rig.tunnel(f"10.96.0.99:{PORT}")
        assert refused.value.status == 400
        with pytest.raises(HboneStreamRefused):
            await rig.tunnel(f"{VIP}:81")


async def test_plain_tcp_is_relayed_to_an_endpoint() -> None:
    async with Rig() as rig:
        stream = await rig.tunnel()
        stream.write(b"\x16\x03\x01 not http at all\n")
        await stream.drain()
        stream.write_eof()
        data = b""
        async with asyncio.timeout(TIMEOUT):
            while chunk := await stream.read(65536):
                data += chunk
        assert data == b"\x16\x03\x01 NOT HTTP AT ALL\n"
        assert sum(p.tunnels for p in rig.pods.values()) == 1


async def test_a_client_stalling_in_its_head_gets_408_and_others_are_served() -> None:
    async with Rig() as rig:
        stalled = await rig.tunnel()
        stalled.write(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Half: ")
        await stalled.drain()
        other = await rig.h1()
        for i in range(5):
            assert (await other.request("GET", f"/meanwhile/{i}")).status == 200
        answer = await H1Client(stalled).response()
        assert answer.status == 408
        assert await asyncio.wait_for(stalled.read(1024), TIMEOUT) == b"", "then it closes"
        assert "/slow" not in [seen.path for seen in rig.seen()]
