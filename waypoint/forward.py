"""Sending a routed request upstream: attempts on endpoints, the route's timeout and
per-try timeout (504, flag UT), retries on another endpoint with backoff, and mirrors
(a bounded number of fire-and-forget copies whose responses are dropped)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, replace

from waypoint.circuit import Overflow
from waypoint.clusters import Cluster
from waypoint.flags import ResponseFlag
from waypoint.headers import Headers
from waypoint.message import Body, BytesBody, ReplayableBody, Request, Response
from waypoint.retry import TIMEOUT, RetryPolicy
from waypoint.upstream import Endpoint, IdleSet, Tunnels, UpstreamError
from waypoint.upstream_h1 import H1Exchange
from waypoint.upstream_h2 import H2Upstreams

log = logging.getLogger(__name__)

MIRROR_TIMEOUT = 10.0
NO_TIMEOUT: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
MAX_MIRRORS = 64


def _reply(status: int, text: str, *flags: ResponseFlag) -> Response:
    return Response(
        status, [("content-type", "text/plain")], BytesBody(text.encode()), flags=list(flags)
    )


@dataclass
class ForwardPlan:
    request: Request
    endpoints: list[Endpoint]
    cluster: Cluster
    retry: RetryPolicy
    # The route's timeout in seconds (0: none), from the request's start to the
    # response head.
    timeout: float = 0.0
    # Set when the body may have to be sent again (retries, mirrors).
    replay: ReplayableBody | None = None


class _InFlight:
    """One attempt's hold on the balancer's and circuit breaker's counts, let go once."""

    def __init__(self, cluster: Cluster, endpoint: Endpoint) -> None:
        cluster.circuit.enter_request()  # Overflow: the caller answers 503 UO
        cluster.balancer.started(endpoint)
        self._cluster = cluster
        self._endpoint = endpoint
        self._held = True

    def release(self, *_: object) -> None:
        if self._held:
            self._held = False
            self._cluster.balancer.finished(self._endpoint)
            self._cluster.circuit.exit_request()


def _grpc_status(response: Response) -> int | None:
    for name, value in response.headers:
        if name == "grpc-status" and value.isdigit():
            return int(value)
    return None


class Forwarder:
    def __init__(self, tunnels: Tunnels, idle: IdleSet, rng: random.Random | None = None):
        self.tunnels = tunnels
        self.idle = idle
        self.h2 = H2Upstreams(tunnels)
        self._rng = rng or random.Random()
        self._mirrors: set[asyncio.Task[None]] = set()

    async def forward(self, plan: ForwardPlan) -> Response:
        """Try, and retry on another endpoint what the policy says is retriable, within
        the budget and the circuit breaker's retry limit; the last outcome is answered."""
        cluster, retry = plan.cluster, plan.retry
        deadline = time.monotonic() + plan.timeout if plan.timeout else None
        tried: list[Endpoint] = []
        retrying = False
        try:
            while True:
                outcome = await self._try(plan, tried, deadline)
                timed_out = isinstance(outcome, Response) and (
                    ResponseFlag.UPSTREAM_REQUEST_TIMEOUT in outcome.flags
                )
                if timed_out or len(tried) > retry.attempts or not self._retriable(plan, outcome):
                    return self._finish(plan, outcome, tried, deadline)
                if retrying:
                    cluster.circuit.exit_retry()
                    retrying = False
                if not cluster.circuit.try_retry():
                    return self._finish(plan, outcome, tried, deadline)
                retrying = True
                if isinstance(outcome, Response):
                    outcome.body.close()
                    outcome.complete(0, None)  # lets go of the attempt's in-flight counts
                delay = retry.backoff(len(tried) - 1, self._rng)
                remaining = _remaining(deadline)
                if remaining is not None and delay >= remaining:
                    return self._finish(plan, _timeout_reply(), tried)
                await asyncio.sleep(delay)
        finally:
            if retrying:
                cluster.circuit.exit_retry()

    async def _try(
        self, plan: ForwardPlan, tried: list[Endpoint], deadline: float | None
    ) -> Response | UpstreamError:
        cluster = plan.cluster
        healthy = cluster.outlier.healthy(plan.endpoints)
        endpoint = cluster.balancer.pick(healthy, tried)
        if endpoint is None:
            return _reply(503, "no healthy upstream\n", ResponseFlag.NO_HEALTHY_UPSTREAM)
        try:
            hold = _InFlight(cluster, endpoint)
        except Overflow as exc:
            return _reply(503, "upstream connect error: overflow\n", exc.flag)
        tried.append(endpoint)
        body: Body = plan.replay.reader() if plan.replay is not None else plan.request.body
        limit = _remaining(deadline)
        per_try = plan.retry.per_try_timeout_seconds
        if per_try and (limit is None or per_try < limit):
            limit = per_try
        outcome: Response | UpstreamError
        try:
            # no timeout (Istio's default route): no Timeout to enter and leave (~3 %)
            async with asyncio.timeout(limit) if limit is not None else NO_TIMEOUT:
                outcome = await self.attempt(endpoint, plan.request, body)
        except TimeoutError:
            hold.release()
            cluster.outlier.record(endpoint, None, True)
            if deadline is not None and time.monotonic() >= deadline:
                return _timeout_reply()
            return UpstreamError(
                "per-try timeout", TIMEOUT, ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, 504
            )
        except UpstreamError as exc:
            hold.release()
            cluster.outlier.record(endpoint, None, True)
            return exc
        except BaseException:
            hold.release()
            raise
        cluster.outlier.record(endpoint, outcome.status, False)
        outcome.upstream, outcome.upstream_uid = endpoint.authority, endpoint.uid
        outcome.then(hold.release)
        return outcome

    @staticmethod
    def _retriable(plan: ForwardPlan, outcome: Response | UpstreamError) -> bool:
        if plan.replay is not None and not plan.replay.replayable:
            return False
        if plan.replay is None and plan.request.body.length != 0:
            return False
        if isinstance(outcome, UpstreamError):
            return plan.retry.should_retry(None, outcome.condition)
        if not outcome.upstream:
            return False  # a local answer (no healthy upstream, overflow): final
        return plan.retry.should_retry(outcome.status, None, grpc_status=_grpc_status(outcome))

    @staticmethod
    def _finish(
        plan: ForwardPlan,
        outcome: Response | UpstreamError,
        tried: list[Endpoint],
        deadline: float | None = None,
    ) -> Response:
        if isinstance(outcome, UpstreamError):
            flags = [outcome.flag]
            if plan.retry.attempts and len(tried) > plan.retry.attempts:
                flags.append(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
            text = f"upstream connect error or disconnect/reset before headers: {outcome}\n"
            if outcome.status == 504:
                text = "upstream request timeout\n"
            response = _reply(outcome.status, text, *flags)
            if tried:
                response.upstream, response.upstream_uid = tried[-1].authority, tried[-1].uid
        else:
            response = outcome
            if deadline is not None:
                response.body = _DeadlineBody(response.body, deadline, response)
        response.attempts = len(tried)
        replay = plan.replay
        if replay is not None:  # once the response is out, a body kept for replay goes
            response.then(lambda *_: replay.close())
        return response

    async def attempt(self, endpoint: Endpoint, request: Request, body: Body) -> Response:
        """One try on `endpoint`: HTTP/2 if the request came so (on the endpoint's shared
        connection); else an idle HTTP/1.1 connection if there is one (a fresh one if that
        turns out stale before any response byte), else a new tunnel."""
        if request.protocol == "HTTP/2":
            return await self.h2.send(endpoint, request, body)
        tunnel = self.idle.take(endpoint)
        if tunnel is not None:
            exchange = H1Exchange(tunnel, endpoint, self._release)
            try:
                return self._upgraded(exchange, await exchange.send(request, body))
            except UpstreamError as exc:
                if exc.condition != "reset" or body.length != 0:
                    raise
                log.debug("idle connection to %s was stale: %s", endpoint.authority, exc)
        exchange = H1Exchange(await self.tunnels.open(endpoint), endpoint, self._release)
        return self._upgraded(exchange, await exchange.send(request, body))

    @staticmethod
    def _upgraded(exchange: H1Exchange, response: Response) -> Response:
        response.upgraded = exchange.upgraded
        return response

    def _release(self, exchange: H1Exchange, reusable: bool) -> None:
        if reusable:
            self.idle.put(exchange.endpoint, exchange.tunnel)
        else:
            exchange.tunnel.close()

    def mirror(self, request: Request, endpoint: Endpoint, replay: ReplayableBody | None) -> None:
        """Send a copy of `request` (Host gets Envoy's "-shadow" suffix) once its body is
        complete; the response is read and dropped. Skipped when too many are in flight."""
        if len(self._mirrors) >= MAX_MIRRORS:
            log.debug("mirror to %s dropped: %d in flight", endpoint.authority, MAX_MIRRORS)
            return
        task = asyncio.get_running_loop().create_task(self._mirror(request, endpoint, replay))
        self._mirrors.add(task)
        task.add_done_callback(self._mirrors.discard)

    async def _mirror(
        self, request: Request, endpoint: Endpoint, replay: ReplayableBody | None
    ) -> None:
        host, sep, port = request.authority.rpartition(":")
        authority = (
            f"{host}-shadow:{port}" if sep and port.isdigit() else f"{request.authority}-shadow"
        )
        try:
            async with asyncio.timeout(MIRROR_TIMEOUT):
                body = BytesBody()
                if replay is not None:
                    if not await asyncio.shield(replay.complete):
                        return  # too big to keep, or the request failed
                    body = BytesBody(replay.recorded())
                copy = replace(request, authority=authority, body=body)
                response = await self.attempt(endpoint, copy, body)
                while await response.body.read():
                    pass
        except (TimeoutError, UpstreamError, ConnectionError) as exc:
            log.debug("mirror to %s failed: %s", endpoint.authority, exc)

    async def close(self) -> None:
        for task in list(self._mirrors):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._mirrors, return_exceptions=True)
        self.idle.close()
        self.h2.close()
        self.tunnels.close()


class RouteTimeout(TimeoutError):
    """The route's timeout ran out while the response body was still coming."""


class _DeadlineBody:
    """The route timeout bounds the whole response, as Envoy's does: a body still
    streaming at the deadline is cut (the client sees the stream reset) and flagged UT."""

    def __init__(self, body: Body, deadline: float, response: Response) -> None:
        self._body = body
        self._deadline = deadline
        self._response = response

    @property
    def length(self) -> int | None:
        return self._body.length

    @property
    def trailers(self) -> Headers:
        return self._body.trailers

    async def read(self) -> bytes:
        try:
            async with asyncio.timeout(max(0.0, self._deadline - time.monotonic())):
                return await self._body.read()
        except TimeoutError:
            if ResponseFlag.UPSTREAM_REQUEST_TIMEOUT not in self._response.flags:
                self._response.flags.append(ResponseFlag.UPSTREAM_REQUEST_TIMEOUT)
            raise RouteTimeout("upstream request timeout in the response body") from None

    def close(self) -> None:
        self._body.close()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _timeout_reply() -> Response:
    return _reply(504, "upstream request timeout\n", ResponseFlag.UPSTREAM_REQUEST_TIMEOUT)
