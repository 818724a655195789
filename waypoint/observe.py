"""What the request path reports once a response is out: Istio's request metrics, one JSON
access log line, and the span (when an OTLP collector is configured)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from mesh.api import mesh_pb2
from mesh.spiffe import identity_of
from waypoint import headers as h
from waypoint.context import Downstream
from waypoint.flags import ResponseFlag
from waypoint.forward import RouteTimeout
from waypoint.headers import Headers
from waypoint.memo import ConfigMemo
from waypoint.message import Body, Request, Response
from waypoint.state import WaypointState
from waypoint.telemetry import RequestMetrics, RequestPeers, RequestRecord, access_log
from waypoint.tracing import TraceContext

access = logging.getLogger("waypoint.access")


class Exporter(Protocol):
    def export(self, trace: TraceContext, record: RequestRecord) -> None: ...


class CountingBody:
    """The request body as read from the caller, counted for `istio_request_bytes`."""

    def __init__(self, inner: Body) -> None:
        self._inner = inner
        self.count = 0

    @property
    def length(self) -> int | None:
        return self._inner.length

    async def read(self) -> bytes:
        data = await self._inner.read()
        self.count += len(data)
        return data

    @property
    def trailers(self) -> Headers:
        return self._inner.trailers

    def close(self) -> None:
        self._inner.close()


@dataclass
class Observation:
    """One request from its arrival: filled as the request path learns things."""

    downstream: Downstream
    request: Request
    trace: TraceContext
    body: CountingBody
    started: float = field(default_factory=time.monotonic)
    wall: float = field(default_factory=time.time)
    route: str = ""
    service: mesh_pb2.Service | None = None


def _grpc_status(response: Response) -> int | None:
    value = h.get(response.headers, "grpc-status") or h.get(response.body.trailers, "grpc-status")
    return int(value) if value is not None and value.isdigit() else None


class Observer:
    def __init__(self, metrics: RequestMetrics | None, exporter: Exporter | None = None):
        self._metrics = metrics
        self._exporter = exporter
        # Building the peers (two label lookups per side, 20 fields) cost ~5 % of a request.
        self._peers: ConfigMemo[RequestPeers] = ConfigMemo()

    def _between(
        self,
        state: WaypointState,
        downstream: Downstream,
        destination: mesh_pb2.Workload | None,
        service: mesh_pb2.Service | None,
    ) -> RequestPeers:
        source = downstream.source
        return self._peers.get(
            state,
            (source, destination, service),
            downstream.peer.uri,
            lambda: RequestPeers.between(
                source,
                downstream.peer.uri,
                destination,
                identity_of(destination).uri if destination is not None else None,
                service,
            ),
        )

    def done(
        self,
        seen: Observation,
        state: WaypointState,
        response: Response,
        sent: int,
        error: BaseException | None,
    ) -> None:
        request, downstream = seen.request, seen.downstream
        destination = state.workloads.get(response.upstream_uid)
        flags = list(response.flags)
        if error is not None and not sent and not isinstance(error, RouteTimeout):
            # Nothing of the body got out: the caller (or the tunnel to it) went away.
            flags.append(ResponseFlag.DOWNSTREAM_CONNECTION_TERMINATION)
        grpc = (h.get(request.headers, "content-type") or "").startswith("application/grpc")
        record = RequestRecord(
            peers=self._between(state, downstream, destination, seen.service),
            method=request.method,
            authority=request.authority,
            path=request.path,
            status=response.status,
            protocol=request.protocol,
            grpc=grpc,
            grpc_status=_grpc_status(response) if grpc else None,
            flags=flags,
            upstream=response.upstream,
            attempts=response.attempts,
            duration_seconds=time.monotonic() - seen.started,
            bytes_received=seen.body.count,
            bytes_sent=sent,
            start_time=seen.wall,
            trace_id=seen.trace.trace_id,
            route=seen.route,
            details=response.details,
            user_agent=h.get(request.headers, "user-agent") or "",
            request_id=h.get(request.headers, "x-request-id") or "",
        )
        if self._metrics is not None:
            self._metrics.record(record)
        if access.isEnabledFor(logging.INFO):
            access.info("%s", access_log(record))
        if self._exporter is not None:
            self._exporter.export(seen.trace, record)
