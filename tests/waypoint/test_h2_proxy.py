"""HTTP/2 with prior knowledge through a real waypoint on loopback: requests stay HTTP/2
to the endpoint, a gRPC-style call keeps its trailers end to end, bodies stream both
ways, and routes apply as for HTTP/1.1."""

from __future__ import annotations

import pytest

from mesh.api import mesh_pb2
from tests.waypoint.h2_peers import H2Client, h2_app
from tests.waypoint.rig import Rig, backend, routes

pytestmark = pytest.mark.asyncio


async def test_grpc_call_keeps_trailers_end_to_end() -> None:
    async with Rig() as rig:
        for pod in rig.pods.values():
            h2_app(pod)
        client = H2Client(await rig.tunnel())
        message = b"\x00\x00\x00\x00\x05hello"
        result = await client.request(
            "/demo.Greeter/SayHello", message, [("content-type", "application/grpc")]
        )
        assert result.headers[":status"] == "200"
        assert result.body == message
        assert result.trailers == {"grpc-status": "0", "grpc-message": "done"}
        seen = rig.seen()[0]
        assert seen.headers["te"] == "trailers"
        assert seen.headers[":authority"] == "reviews.demo.svc.cluster.local"


async def test_grpc_error_status_in_trailers() -> None:
    async with Rig() as rig:
        for pod in rig.pods.values():
            h2_app(pod)
        client = H2Client(await rig.tunnel())
        result = await client.request("/demo.Greeter/Fail", b"\x00" * 5, [("x-grpc-status", "14")])
        assert result.trailers["grpc-status"] == "14"


async def test_many_requests_share_one_upstream_connection_per_endpoint() -> None:
    async with Rig() as rig:
        for pod in rig.pods.values():
            h2_app(pod)
        client = H2Client(await rig.tunnel())
        for i in range(20):
            result = await client.request(f"/x/{i}", b"%d" % i)
            assert result.body == b"%d" % i
        assert [p.tunnels for p in rig.pods.values()] == [1, 1]


async def test_large_bodies_stream_both_ways() -> None:
    async with Rig() as rig:
        for pod in rig.pods.values():
            h2_app(pod)
        client = H2Client(await rig.tunnel())
        big = bytes(range(256)) * 8192  # 2 MiB, far beyond every window
        assert (await client.request("/echo", big)).body == big
        download = await client.request("/bytes/5000000")
        assert len(download.body) == 5_000_000


async def test_header_routing_applies_to_http2() -> None:
    async with Rig() as rig:
        for pod in rig.pods.values():
            h2_app(pod)
        match = mesh_pb2.HttpRouteMatch(
            headers=[
                mesh_pb2.HttpHeaderMatch(name="x-v", value=mesh_pb2.HttpStringMatch(exact="2"))
            ]
        )
        rig.configure(
            routes(
                mesh_pb2.HttpRouteRule(matches=[match], backends=[backend("v2")]),
                mesh_pb2.HttpRouteRule(backends=[backend("v1")]),
            )
        )
        client = H2Client(await rig.tunnel())
        for _ in range(5):
            assert (await client.request("/", b"a", [("x-v", "2")])).headers[
                "x-pod"
            ] == "reviews-v2"
            assert (await client.request("/", b"a")).headers["x-pod"] == "reviews-v1"
