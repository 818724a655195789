"""Resilience and policy in the request path of a real waypoint on loopback: retries on
another endpoint, Istio's default retry of connect failures, timeouts, circuit breaking,
rate limits, fault injection, L7 authorization, and the metrics they leave behind."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from mesh.api import mesh_pb2
from tests.waypoint.rig import HOST, Rig, backend, base_resources, routes, workload

pytestmark = pytest.mark.asyncio


def sample(rig: Rig, name: str, **labels: str) -> float:
    """The sum of `name` over every series carrying `labels` (and any others)."""
    return sum(
        s.value
        for metric in rig.registry.collect()
        for s in metric.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


async def test_5xx_is_retried_on_the_other_endpoint() -> None:
    async with Rig() as rig:
        rig.pods["reviews-v1"].override = 503
        retry = mesh_pb2.HttpRetry(attempts=2, retry_on=["5xx"])
        rig.configure(routes(mesh_pb2.HttpRouteRule(backends=[backend()], retry=retry)))
        client = await rig.h1()
        for _ in range(10):
            response = await client.request("GET", "/")
            assert response.status == 200
            assert response.json()["pod"] == "reviews-v2"
        assert rig.pods["reviews-v1"].seen, "the failing endpoint was never tried"


async def test_the_retry_budget_caps_retries_in_an_outage() -> None:
    """One call at a time, every retry is within the budget's floor (3 in flight); 40 at
    once, at most 20 % of the active requests may be retries. Calls whose failed attempts
    were retried must not stay counted as active (which would lift the cap)."""
    async with Rig() as rig:
        for pod in rig.pods.values():
            pod.override = 503
        retry = mesh_pb2.HttpRetry(attempts=3, retry_on=["5xx"])
        rig.configure(routes(mesh_pb2.HttpRouteRule(backends=[backend()], retry=retry)))
        client = await rig.h1()
        for _ in range(50):
            assert (await client.request("GET", "/alone")).status == 503
        assert len(rig.seen()) == 50 * 4
        clients = [await rig.h1() for _ in range(40)]
        answers = await asyncio.gather(*(c.request("GET", "/crowd") for c in clients))
        assert {a.status for a in answers} == {503}
        crowd = len(rig.seen()) - 50 * 4
        assert crowd < 2 * len(clients), f"{crowd} attempts for {len(clients)} calls"


async def test_5xx_without_retry_policy_is_answered_as_is() -> None:
    async with Rig() as rig:
        rig.pods["reviews-v1"].override = 503
        rig.pods["reviews-v2"].override = 503
        retry = mesh_pb2.HttpRetry(attempts=0)
        rig.configure(routes(mesh_pb2.HttpRouteRule(backends=[backend()], retry=retry)))
        client = await rig.h1()
        assert (await client.request("GET", "/")).status == 503
        assert len(rig.seen()) == 1


async def test_dead_endpoint_is_skipped_by_the_default_retry() -> None:
    resources = base_resources()
    dead = workload("reviews-v3", "127.0.0.4", "reviews", version="v3")
    resources[dead.key] = dead
    resources["Service/demo/reviews"].service.endpoint_uids.append("uid-reviews-v3")
    async with Rig(resources) as rig:
        client = await rig.h1()
        for _ in range(12):  # no route table: Istio's default retry (connect-failure)
            assert (await client.request("GET", "/")).status == 200


async def test_route_timeout_answers_504_ut() -> None:
    async with Rig() as rig:
        rig.configure(routes(mesh_pb2.HttpRouteRule(backends=[backend()], timeout_seconds=0.3)))
        client = await rig.h1()
        started = time.monotonic()
        response = await client.request("GET", "/delay/3000")
        assert response.status == 504
        assert response.body == b"upstream request timeout\n"
        assert time.monotonic() - started < 2.0
        await asyncio.sleep(0)
        assert sample(rig, "istio_requests_total", response_code="504", response_flags="UT") == 1.0


async def test_route_timeout_also_bounds_the_response_body() -> None:
    """Envoy's route timeout covers the whole response: a body still trickling at the
    deadline is cut, and the request is counted with flag UT."""
    async with Rig() as rig:
        rig.configure(routes(mesh_pb2.HttpRouteRule(backends=[backend()], timeout_seconds=0.5)))
        client = await rig.h1()
        with pytest.raises(ConnectionError):
            await client.request("GET", "/trickle/200/20")  # a 4 s body
        await asyncio.sleep(0.1)
        assert sample(rig, "istio_requests_total", response_code="200", response_flags="UT") == 1.0
        fast = await (await rig.h1()).request("GET", "/trickle/10/3")
        assert (fast.status, fast.body) == (200, b"piece" * 3)


async def test_circuit_breaker_overflow_is_503_uo() -> None:
    async with Rig() as rig:
        policy = mesh_pb2.DestinationPolicy(
            service=HOST,
            policy=mesh_pb2.TrafficPolicy(
                connection_pool=mesh_pb2.ConnectionPool(max_requests=1, max_retries=1)
            ),
        )
        rig.configure(mesh_pb2.Resource(key="DestinationPolicy/demo/r", destination_policy=policy))
        slow = await rig.h1()
        fast = await rig.h1()
        pending = asyncio.create_task(slow.request("GET", "/delay/500"))
        await asyncio.sleep(0.2)
        overflow = await fast.request("GET", "/")
        assert overflow.status == 503
        assert (await pending).status == 200
        assert (await fast.request("GET", "/")).status == 200
        assert sample(rig, "istio_requests_total", response_code="503", response_flags="UO") == 1


async def test_rate_limit_is_429_rl() -> None:
    async with Rig() as rig:
        limit = mesh_pb2.RateLimit(service=HOST, requests=3, per_seconds=3600)
        rig.configure(mesh_pb2.Resource(key="RateLimit/demo/r", rate_limit=limit))
        client = await rig.h1()
        statuses = [(await client.request("GET", "/")).status for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]


async def test_fault_abort_and_delay() -> None:
    async with Rig() as rig:
        abort = mesh_pb2.HttpFault(abort_status=418, abort_percent=100)
        rig.configure(routes(mesh_pb2.HttpRouteRule(backends=[backend()], fault=abort)))
        client = await rig.h1()
        assert (await client.request("GET", "/")).status == 418
        assert not rig.seen()
        delay = mesh_pb2.HttpFault(delay_seconds=0.3)
        rig.configure(routes(mesh_pb2.HttpRouteRule(backends=[backend()], fault=delay)))
        started = time.monotonic()
        assert (await client.request("GET", "/")).status == 200
        assert time.monotonic() - started >= 0.3
        assert sample(rig, "istio_requests_total", response_code="200", response_flags="DI") == 1


async def test_l7_authorization_denies_with_403(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="waypoint.access")
    async with Rig() as rig:
        deny = mesh_pb2.HttpAuthorizationPolicy(
            name="no-admin",
            namespace="demo",
            target_refs=["Service/demo/reviews"],
            action=mesh_pb2.AuthorizationPolicy.DENY,
            rules=[
                mesh_pb2.HttpAuthorizationRule(
                    clauses=[
                        mesh_pb2.HttpAuthorizationClause(
                            matches=[
                                mesh_pb2.HttpAuthorizationMatch(
                                    paths=[mesh_pb2.StringMatch(prefix="/admin")]
                                )
                            ]
                        )
                    ]
                )
            ],
        )
        rig.configure(
            mesh_pb2.Resource(key="HttpAuthorizationPolicy/demo/d", http_authorization_policy=deny)
        )
        client = await rig.h1()
        denied = await client.request("GET", "/admin/users")
        assert (denied.status, denied.body) == (403, b"RBAC: access denied")
        assert (await client.request("GET", "/public")).status == 200
        assert [s.path for s in rig.seen()] == ["/public"]
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "waypoint.access"]
    assert [(x["path"], x["response_code_details"]) for x in lines] == [
        ("/admin/users", "rbac_access_denied_matched_policy[demo/no-admin]"),
        ("/public", None),
    ]


async def test_metrics_name_both_workloads() -> None:
    async with Rig() as rig:
        client = await rig.h1()
        response = await client.request("GET", "/")
        pod = response.json()["pod"]
        await asyncio.sleep(0)
        labels = {
            "reporter": "waypoint",
            "source_workload": "sleep",
            "source_principal": "spiffe://cluster.local/ns/demo/sa/sleep",
            "destination_workload": str(pod),
            "destination_service": HOST,
            "response_code": "200",
            "request_protocol": "http",
        }
        assert sample(rig, "istio_requests_total", **labels) == 1.0
