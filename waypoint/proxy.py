"""The request path: route, edit, choose a backend and an endpoint, forward (with the
route's timeout and retries), edit the response. Protocol-neutral: HTTP/1.1 and HTTP/2
servers hand it `Request`s and write back the `Response` it returns.

Nothing here raises to the server: every failure becomes a local reply with Envoy's
status, body and response flag, so callers see what an Envoy waypoint would answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from mesh.api import mesh_pb2
from mesh.hbone.relay import Duplex, relay
from mesh.spiffe import identity_of
from waypoint import authz, cors, fault, ratelimit, router
from waypoint import headers as h
from waypoint.clusters import Clusters
from waypoint.context import Downstream
from waypoint.flags import ResponseFlag
from waypoint.forward import Forwarder, ForwardPlan
from waypoint.memo import ConfigMemo
from waypoint.message import BytesBody, ReplayableBody, Request, Response
from waypoint.observe import CountingBody, Observation, Observer
from waypoint.retry import RetryPolicy
from waypoint.state import WaypointState, target_port
from waypoint.tracing import TRACEPARENT, TRACESTATE, TraceContext
from waypoint.upstream import Endpoint, UpstreamError

log = logging.getLogger(__name__)

StateFn = Callable[[], WaypointState]


def local_reply(status: int, text: str, *flags: ResponseFlag) -> Response:
    return Response(
        status, [("content-type", "text/plain")], BytesBody(text.encode()), flags=list(flags)
    )


@dataclass(frozen=True)
class Backend:
    """Where a routed request goes: a Service port, narrowed to a subset."""

    service: mesh_pb2.Service | None
    port: int
    subset: str = ""
    subset_labels: tuple[tuple[str, str], ...] = ()
    # Waypoint-for-workload traffic: that one pod.
    workload: mesh_pb2.Workload | None = None


def endpoints_of(state: WaypointState, backend: Backend) -> list[Endpoint]:
    if backend.workload is not None:
        workloads = [backend.workload]
        port = backend.port
    else:
        assert backend.service is not None
        workloads = state.endpoints(backend.service, dict(backend.subset_labels))
        port = target_port(backend.service, backend.port) or backend.port
    return [Endpoint(w.addresses[0], port, identity_of(w), w.uid) for w in workloads]


def route_input(downstream: Downstream, request: Request) -> router.RouteInput:
    source = downstream.source
    return router.RouteInput(
        method=request.method,
        target=request.path,
        authority=request.authority,
        headers=request.headers,
        port=downstream.target.port,
        scheme=request.scheme,
        source_namespace=downstream.peer.namespace,
        source_labels=dict(source.labels) if source is not None else {},
    )


class Proxy:
    def __init__(
        self,
        waypoint: str,
        state: StateFn,
        forwarder: Forwarder,
        observer: Observer,
        rng: random.Random | None = None,
    ) -> None:
        """`waypoint` is "<namespace>/<name>" of the Gateway (authorization targets it)."""
        self._gateway_ref = f"Gateway/{waypoint}"
        self._state = state
        self._forwarder = forwarder
        self._observer = observer
        self._rng = rng or random.Random()
        self._clusters = Clusters(self._rng)
        # Derived from the configuration once, not per request (~4 % of a request).
        self._endpoints: ConfigMemo[list[Endpoint]] = ConfigMemo()
        self._retries: ConfigMemo[RetryPolicy] = ConfigMemo()

    async def handle(self, downstream: Downstream, request: Request) -> Response:
        """The response to `request`; its `complete()` reports it (metrics, log, span)."""
        state = self._state()
        counted = CountingBody(request.body)
        request.body = counted
        trace = TraceContext.from_headers(dict(request.headers), self._rng)
        seen = Observation(downstream, request, trace, counted, service=downstream.target.service)
        try:
            response = await self._handle(state, downstream, request, seen)
        except Exception:
            log.exception("request %s %s failed in the waypoint", request.method, request.path)
            response = local_reply(500, "internal error in the waypoint\n")
        response.then(lambda sent, error: self._observer.done(seen, state, response, sent, error))
        return response

    async def _handle(
        self, state: WaypointState, downstream: Downstream, request: Request, seen: Observation
    ) -> Response:
        target = downstream.target
        denied = self._authorize(state, downstream, request)
        if denied is not None:
            return denied
        if target.service is None:
            backend = Backend(None, target.port, workload=target.workload)
            return await self._forward(state, self._upstream(request, seen), backend, None, [])
        if not self._clusters.allow(state.rate_limits.get(target.service.hostname)):
            return local_reply(ratelimit.STATUS, "local_rate_limited", ratelimit.FLAG)
        table = state.route_table(target.service.hostname, target.port)
        if table is None:
            backend = Backend(target.service, target.port)
            return await self._forward(state, self._upstream(request, seen), backend, None, [])
        selected = router.select(table, route_input(downstream, request))
        if selected is None:
            return local_reply(404, "route not found\n", ResponseFlag.NO_ROUTE_FOUND)
        seen.route = selected.rule.name
        policy = selected.rule.cors if selected.rule.HasField("cors") else None
        if policy is not None and (answer := cors.preflight(policy, request)) is not None:
            return answer
        response = await self._faulted_or_routed(state, downstream, request, seen, selected)
        if policy is not None:
            cors.decorate(policy, request, response)
        return response

    async def _faulted_or_routed(
        self,
        state: WaypointState,
        downstream: Downstream,
        request: Request,
        seen: Observation,
        selected: router.Selected,
    ) -> Response:
        decision = fault.decide(
            selected.rule.fault if selected.rule.HasField("fault") else None, self._rng
        )
        if decision.delay_seconds:
            await asyncio.sleep(decision.delay_seconds)
        if decision.abort_status is not None:
            return local_reply(decision.abort_status, "fault filter abort", *decision.flags)
        response = await self._route(state, downstream, self._upstream(request, seen), selected)
        response.flags.extend(decision.flags)
        return response

    def _authorize(
        self, state: WaypointState, downstream: Downstream, request: Request
    ) -> Response | None:
        """403 if the L7 AuthorizationPolicies bound to this waypoint or to the Service
        deny the request; None to go on."""
        refs = [self._gateway_ref]
        service = downstream.target.service
        if service is not None:
            refs.append(f"Service/{service.namespace}/{service.name}")
        policies = authz.select(state.authorization_policies, *refs)
        if not policies:
            return None
        headers: dict[str, str] = {}
        for name, value in request.headers:
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        attrs = authz.RequestAttributes(
            principal=downstream.peer.uri.removeprefix("spiffe://"),
            namespace=downstream.peer.namespace,
            source_ip=downstream.address or "",
            host=request.authority,
            port=downstream.target.port,
            method=request.method,
            path=request.path,
            headers=headers,
        )
        decision = authz.evaluate(policies, attrs)
        if decision.allowed:
            return None
        log.info(
            "request %s %s from %s denied by %s",
            request.method,
            request.path,
            downstream.peer,
            decision.policy or "default deny (ALLOW policies in scope)",
        )
        denied = local_reply(authz.DENIED_STATUS, authz.DENIED_BODY.decode())
        # Envoy's RBAC filter names the policy so: rbac_access_denied_matched_policy[...].
        denied.details = f"rbac_access_denied_matched_policy[{decision.policy or 'none'}]"
        return denied

    def _upstream(self, request: Request, seen: Observation) -> Request:
        """The request as the endpoint gets it: our span as its trace parent, a request id."""
        headers = [(n, v) for n, v in request.headers if n not in (TRACEPARENT, TRACESTATE)]
        headers.extend(seen.trace.headers().items())
        if h.get(headers, "x-request-id") is None:
            headers.append(("x-request-id", str(uuid.uuid4())))
        headers.append(("x-forwarded-proto", request.scheme))
        return replace(request, headers=headers)

    async def _route(
        self,
        state: WaypointState,
        downstream: Downstream,
        request: Request,
        selected: router.Selected,
    ) -> Response:
        rule = selected.rule
        if rule.direct_status:
            response = Response(rule.direct_status, [], BytesBody(rule.direct_body.encode()))
            if rule.direct_body:
                response.headers.append(("content-type", "text/plain"))
            return self._response_edits(response, rule, None)
        if rule.HasField("redirect"):
            location = router.redirect_location(
                rule.redirect, route_input(downstream, request), selected.prefix
            )
            status = rule.redirect.status_code or 301
            return self._response_edits(Response(status, [("location", location)]), rule, None)
        if not rule.backends:
            return local_reply(500, "route has no backends\n", ResponseFlag.NO_ROUTE_FOUND)
        edited = self._request_edits(request, rule, downstream, selected)
        chosen = router.pick_backend(rule.backends, self._rng)
        if not chosen.service:  # the controller's mark for a backend it could not resolve
            return local_reply(500, "invalid backend\n")
        backend = self._backend(state, chosen, downstream.target.port)
        if backend is None:
            return local_reply(503, "no healthy upstream\n", ResponseFlag.NO_HEALTHY_UPSTREAM)
        edited.headers = h.mutate(edited.headers, chosen.request_headers)
        mirrors = [m for m in rule.mirrors if self._rng.uniform(0, 100) < (m.percent or 100)]
        response = await self._forward(state, edited, backend, rule, mirrors)
        return self._response_edits(response, rule, chosen)

    def _backend(
        self, state: WaypointState, backend: mesh_pb2.HttpBackend, port: int
    ) -> Backend | None:
        service = state.services_by_host.get(backend.service)
        if service is None:
            return None
        return Backend(
            service,
            backend.port or port,
            backend.subset,
            tuple(sorted(backend.subset_labels.items())),
        )

    def _request_edits(
        self,
        request: Request,
        rule: mesh_pb2.HttpRouteRule,
        downstream: Downstream,
        selected: router.Selected,
    ) -> Request:
        edited = replace(request, headers=h.mutate(request.headers, rule.request_headers))
        if rule.HasField("rewrite"):
            rewrite = rule.rewrite
            edited.path = router.rewritten_target(
                rewrite, route_input(downstream, request), selected.prefix
            )
            if rewrite.hostname:
                edited.authority = rewrite.hostname
        return edited

    @staticmethod
    def _response_edits(
        response: Response,
        rule: mesh_pb2.HttpRouteRule,
        backend: mesh_pb2.HttpBackend | None,
    ) -> Response:
        if backend is not None:
            response.headers = h.mutate(response.headers, backend.response_headers)
        response.headers = h.mutate(response.headers, rule.response_headers)
        return response

    async def _forward(
        self,
        state: WaypointState,
        request: Request,
        backend: Backend,
        rule: mesh_pb2.HttpRouteRule | None,
        mirrors: list[mesh_pb2.HttpMirror],
    ) -> Response:
        endpoints = self._endpoints.get(
            state,
            (backend.service, backend.workload),
            (backend.port, backend.subset_labels),
            lambda: endpoints_of(state, backend),
        )
        if not endpoints:
            return local_reply(503, "no healthy upstream\n", ResponseFlag.NO_HEALTHY_UPSTREAM)
        host = backend.service.hostname if backend.service is not None else ""
        cluster = self._clusters.cluster(host, backend.subset, state.destination_policies.get(host))
        retry = self._retries.get(
            state,
            (rule,),
            None,
            lambda: RetryPolicy.from_proto(
                rule.retry if rule is not None and rule.HasField("retry") else None
            ),
        )
        body = request.body
        replay: ReplayableBody | None = None
        if (retry.attempts or mirrors) and body.length != 0:
            replay = ReplayableBody(body)
        for mirror in mirrors:
            self._mirror(state, request, mirror, replay, backend.port)
        timeout = rule.timeout_seconds if rule is not None else 0.0
        plan = ForwardPlan(request, list(endpoints), cluster, retry, timeout, replay)
        return await self._forwarder.forward(plan)

    def _mirror(
        self,
        state: WaypointState,
        request: Request,
        mirror: mesh_pb2.HttpMirror,
        replay: ReplayableBody | None,
        port: int,
    ) -> None:
        backend = self._backend(state, mirror.backend, port)
        if backend is None:
            return
        endpoints = endpoints_of(state, backend)
        if endpoints:
            self._forwarder.mirror(request, self._rng.choice(endpoints), replay)

    async def relay_tcp(self, downstream: Downstream, client: Duplex) -> None:
        """Bytes that are not HTTP: L4 only, to an endpoint of the Service (or the pod)."""
        target = downstream.target
        backend = Backend(target.service, target.port, workload=target.workload)
        endpoints = endpoints_of(self._state(), backend)
        if not endpoints:
            log.info("TCP through waypoint to %s: no endpoints", target)
            client.close()
            return
        endpoint = self._rng.choice(endpoints)
        started = time.monotonic()
        try:
            upstream = await self._forwarder.tunnels.open(endpoint)
        except UpstreamError as exc:
            log.info("TCP through waypoint: %s", exc)
            client.close()
            return
        sent, received = await relay(client, upstream)
        log.debug(
            "TCP %s -> %s: %d bytes up, %d down in %.3fs",
            downstream.peer,
            endpoint.authority,
            sent,
            received,
            time.monotonic() - started,
        )
