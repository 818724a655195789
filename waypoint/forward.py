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

from mesh.api import mesh_pb2
from waypoint.flags import ResponseFlag
from waypoint.message import Body, BytesBody, ReplayableBody, Request, Response
from waypoint.upstream import Endpoint, IdleSet, Tunnels, UpstreamError
from waypoint.upstream_h1 import H1Exchange
from waypoint.upstream_h2 import H2Upstreams

log = logging.getLogger(__name__)

MIRROR_TIMEOUT = 10.0
MAX_MIRRORS = 64


def _reply(status: int, text: str, *flags: ResponseFlag) -> Response:
    return Response(
        status, [("content-type", "text/plain")], BytesBody(text.encode()), flags=list(flags)
    )


@dataclass(frozen=True)
class Attempts:
    """The route's timeout (0: none) and retry policy (None: one try)."""

    timeout: float = 0.0
    retry: mesh_pb2.HttpRetry | None = None

    @classmethod
    def for_rule(cls, rule: mesh_pb2.HttpRouteRule | None) -> Attempts:
        if rule is None:
            return cls()
        retry = rule.retry if rule.HasField("retry") and rule.retry.attempts else None
        return cls(rule.timeout_seconds, retry)


@dataclass
class ForwardPlan:
    request: Request
    endpoints: list[Endpoint]
    attempts: Attempts
    # Set when the body may have to be sent again (retries, mirrors).
    replay: ReplayableBody | None = None


def should_retry(retry: mesh_pb2.HttpRetry, status: int | None, condition: str | None) -> bool:
    """Envoy's retry_on for one outcome (a response status, or a failure condition)."""
    on = set(retry.retry_on) or {"5xx"}
    if condition is not None:
        if "5xx" in on or "gateway-error" in on:
            return True
        if condition == "connect-failure" and "connect-failure" in on:
            return True
        if condition in ("reset", "connect-failure") and "reset" in on:
            return True
        return condition == "refused-stream" and "refused-stream" in on
    assert status is not None
    if "5xx" in on and status >= 500:
        return True
    if "gateway-error" in on and status in (502, 503, 504):
        return True
    return "retriable-status-codes" in on and status in retry.retriable_status_codes


def backoff(retry: mesh_pb2.HttpRetry, attempt: int, rng: random.Random) -> float:
    """Exponential with full jitter (Envoy: base 25 ms, cap 10x base)."""
    base = retry.backoff_base_seconds or 0.025
    cap = retry.backoff_max_seconds or base * 10
    return rng.uniform(0, min(cap, base * (2**attempt)))


class Forwarder:
    def __init__(self, tunnels: Tunnels, idle: IdleSet, rng: random.Random | None = None):
        self.tunnels = tunnels
        self.idle = idle
        self.h2 = H2Upstreams(tunnels)
        self._rng = rng or random.Random()
        self._mirrors: set[asyncio.Task[None]] = set()

    async def forward(self, plan: ForwardPlan) -> Response:
        attempts = plan.attempts
        retry = attempts.retry
        tries = 1 + (retry.attempts if retry is not None else 0)
        deadline = time.monotonic() + attempts.timeout if attempts.timeout else None
        tried: list[Endpoint] = []
        outcome: Response | UpstreamError | None = None
        for n in range(tries):
            endpoint = self._pick(plan.endpoints, tried)
            tried.append(endpoint)
            body: Body = plan.replay.reader() if plan.replay is not None else plan.request.body
            limit = _remaining(deadline)
            per_try = retry.per_try_timeout_seconds if retry is not None else 0.0
            if per_try and (limit is None or per_try < limit):
                limit = per_try
            try:
                async with asyncio.timeout(limit):
                    outcome = await self.attempt(endpoint, plan.request, body)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    return self._finish(plan, _timeout_reply())
                outcome = UpstreamError(
                    "per-try timeout", "reset", ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, 504
                )
            except UpstreamError as exc:
                outcome = exc
            if retry is None or n + 1 == tries or not self._may_retry(retry, outcome, plan):
                break
            if isinstance(outcome, Response):
                outcome.body.close()
            delay = backoff(retry, n, self._rng)
            remaining = _remaining(deadline)
            if remaining is not None and delay >= remaining:
                return self._finish(plan, _timeout_reply())
            await asyncio.sleep(delay)
        assert outcome is not None
        if isinstance(outcome, UpstreamError):
            flags = [outcome.flag]
            if retry is not None and len(tried) == tries:
                flags.append(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
            text = f"upstream connect error or disconnect/reset before headers: {outcome}\n"
            if outcome.status == 504:
                text = "upstream request timeout\n"
            return self._finish(plan, _reply(outcome.status, text, *flags))
        return self._finish(plan, outcome)

    @staticmethod
    def _may_retry(
        retry: mesh_pb2.HttpRetry, outcome: Response | UpstreamError, plan: ForwardPlan
    ) -> bool:
        if plan.replay is not None and not plan.replay.replayable:
            return False
        if plan.replay is None and plan.request.body.length != 0:
            return False
        if isinstance(outcome, Response):
            return should_retry(retry, outcome.status, None)
        return should_retry(retry, None, outcome.condition)

    def _pick(self, endpoints: list[Endpoint], tried: list[Endpoint]) -> Endpoint:
        fresh = [e for e in endpoints if e not in tried]
        return self._rng.choice(fresh or endpoints)

    @staticmethod
    def _finish(plan: ForwardPlan, response: Response) -> Response:
        """Once the response is out, a body kept for replay is released."""
        replay = plan.replay
        if replay is None:
            return response
        previous = response.on_complete

        def done(sent: int, error: BaseException | None) -> None:
            replay.close()
            if previous is not None:
                previous(sent, error)

        response.on_complete = done
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


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _timeout_reply() -> Response:
    return _reply(504, "upstream request timeout\n", ResponseFlag.UPSTREAM_REQUEST_TIMEOUT)
