"""Route tables executed by a real waypoint on loopback: weighted split, header and
source routing, redirect, rewrite, header mutations, direct responses, mirrors, no route."""

from __future__ import annotations

import asyncio

import pytest

from mesh.api import mesh_pb2
from tests.waypoint.rig import HOST, Rig, backend, routes

pytestmark = pytest.mark.asyncio


def rule(*matches: mesh_pb2.HttpRouteMatch, **kwargs: object) -> mesh_pb2.HttpRouteRule:
    return mesh_pb2.HttpRouteRule(matches=list(matches), **kwargs)  # type: ignore[arg-type]


def path_prefix(prefix: str) -> mesh_pb2.HttpRouteMatch:
    return mesh_pb2.HttpRouteMatch(path=mesh_pb2.HttpStringMatch(prefix=prefix))


async def test_weighted_split_90_10() -> None:
    async with Rig() as rig:
        rig.configure(routes(rule(backends=[backend("v1", 90), backend("v2", 10)])))
        client = await rig.h1()
        n = 400
        pods = [(await client.request("GET", "/")).json()["pod"] for _ in range(n)]
        v2 = pods.count("reviews-v2")
        # Binomial(400, 0.1): mean 40, sd 6; 16..64 is four sd either side.
        assert 16 <= v2 <= 64, v2


async def test_header_match_routes_to_a_subset() -> None:
    async with Rig() as rig:
        jason = mesh_pb2.HttpRouteMatch(
            headers=[
                mesh_pb2.HttpHeaderMatch(
                    name="end-user", value=mesh_pb2.HttpStringMatch(exact="jason")
                )
            ]
        )
        rig.configure(routes(rule(jason, backends=[backend("v2")]), rule(backends=[backend("v1")])))
        client = await rig.h1()
        for _ in range(10):
            assert (await client.request("GET", "/", {"end-user": "jason"})).json()[
                "pod"
            ] == "reviews-v2"
            assert (await client.request("GET", "/")).json()["pod"] == "reviews-v1"


async def test_source_namespace_and_labels_match() -> None:
    async with Rig() as rig:
        from_sleep = mesh_pb2.HttpRouteMatch(
            source_namespace="demo", source_labels={"app": "sleep"}
        )
        from_other = mesh_pb2.HttpRouteMatch(source_namespace="other")
        rig.configure(
            routes(
                rule(from_other, backends=[backend("v1")]),
                rule(from_sleep, backends=[backend("v2")]),
            )
        )
        client = await rig.h1()
        assert (await client.request("GET", "/")).json()["pod"] == "reviews-v2"


async def test_no_matching_rule_is_404() -> None:
    async with Rig() as rig:
        rig.configure(routes(rule(path_prefix("/api"), backends=[backend()])))
        client = await rig.h1()
        response = await client.request("GET", "/other")
        assert response.status == 404
        assert (await client.request("GET", "/api/x")).status == 200


async def test_redirect() -> None:
    async with Rig() as rig:
        redirect = mesh_pb2.HttpRedirect(prefix="/v2", status_code=302)
        rig.configure(routes(rule(path_prefix("/v1"), redirect=redirect)))
        client = await rig.h1()
        response = await client.request("GET", "/v1/items?page=2")
        assert response.status == 302
        assert response.headers["location"] == f"http://{HOST}/v2/items?page=2"
        assert not rig.seen()


async def test_rewrite_prefix_and_host() -> None:
    async with Rig() as rig:
        match = mesh_pb2.HttpRouteMatch(
            path=mesh_pb2.HttpStringMatch(regex="(?P<prefix>/api)(?:/.*)?")
        )
        rewrite = mesh_pb2.HttpRewrite(prefix="/", hostname="internal.example")
        rig.configure(routes(rule(match, rewrite=rewrite, backends=[backend()])))
        client = await rig.h1()
        body = (await client.request("GET", "/api/items?x=1")).json()
        assert body["path"] == "/items?x=1"
        assert body["headers"]["host"] == "internal.example"  # type: ignore[index]


async def test_header_mutations_on_request_and_response() -> None:
    async with Rig() as rig:
        chosen = backend()
        chosen.request_headers.set["x-backend"] = "yes"
        chosen.response_headers.add["x-served-by"] = "backend"
        rig.configure(
            routes(
                rule(
                    backends=[chosen],
                    request_headers=mesh_pb2.HttpHeaderMutation(
                        set={"x-route": "1"}, remove=["x-drop"]
                    ),
                    response_headers=mesh_pb2.HttpHeaderMutation(remove=["x-pod"]),
                )
            )
        )
        client = await rig.h1()
        response = await client.request("GET", "/", {"x-drop": "1", "x-keep": "1"})
        headers = response.json()["headers"]
        assert headers["x-route"] == "1" and headers["x-backend"] == "yes"  # type: ignore[index]
        assert "x-drop" not in headers and headers["x-keep"] == "1"  # type: ignore[operator,index]
        assert response.headers["x-served-by"] == "backend"
        assert "x-pod" not in response.headers


async def test_direct_response() -> None:
    async with Rig() as rig:
        rig.configure(routes(rule(direct_status=418, direct_body="teapot")))
        client = await rig.h1()
        response = await client.request("GET", "/")
        assert (response.status, response.body) == (418, b"teapot")


async def test_mirror_sends_a_copy_with_the_body() -> None:
    async with Rig() as rig:
        mirror = mesh_pb2.HttpMirror(backend=backend("v2"), percent=100)
        rig.configure(routes(rule(backends=[backend("v1")], mirrors=[mirror])))
        client = await rig.h1()
        response = await client.request("POST", "/m", body=b"z" * 1000)
        assert response.json()["pod"] == "reviews-v1"
        async with asyncio.timeout(5):
            while not rig.pods["reviews-v2"].seen:
                await asyncio.sleep(0.01)
        copy = rig.pods["reviews-v2"].seen[0]
        assert copy.body_bytes == 1000
        assert copy.headers["host"] == f"{HOST}-shadow"


async def test_an_unresolvable_backend_share_is_500() -> None:
    async with Rig() as rig:
        invalid = mesh_pb2.HttpBackend(service="", weight=1)
        rig.configure(routes(rule(backends=[invalid])))
        client = await rig.h1()
        assert (await client.request("GET", "/")).status == 500
        assert not rig.seen()


async def test_cors_preflight_is_answered_and_responses_carry_the_headers() -> None:
    async with Rig() as rig:
        cors = mesh_pb2.HttpCors(
            allow_origins=[mesh_pb2.HttpStringMatch(exact="https://app.example")],
            allow_methods=["GET", "PUT"],
            allow_headers=["x-token"],
            expose_headers=["x-trace"],
            max_age_seconds=600,
            allow_credentials=True,
        )
        rig.configure(routes(rule(backends=[backend()], cors=cors)))
        client = await rig.h1()
        asked = {"origin": "https://app.example", "access-control-request-method": "PUT"}
        preflight = await client.request("OPTIONS", "/pre", asked)
        assert preflight.status == 200
        assert {k: v for k, v in preflight.headers.items() if k.startswith("access-")} == {
            "access-control-allow-origin": "https://app.example",
            "access-control-allow-methods": "GET,PUT",
            "access-control-allow-headers": "x-token",
            "access-control-max-age": "600",
            "access-control-allow-credentials": "true",
        }
        actual = await client.request("GET", "/actual", {"origin": "https://app.example"})
        assert actual.status == 200
        assert actual.headers["access-control-allow-origin"] == "https://app.example"
        assert actual.headers["access-control-expose-headers"] == "x-trace"
        # Another origin: no CORS headers, and its preflight goes on to the backend.
        other = {"origin": "https://evil.example", "access-control-request-method": "PUT"}
        forwarded = await client.request("OPTIONS", "/other", other)
        assert "access-control-allow-origin" not in forwarded.headers
        assert [s.path for s in rig.seen()] == ["/actual", "/other"]
