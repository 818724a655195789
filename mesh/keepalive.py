"""gRPC keepalive of the node -> controller connections, one source for both ends.

The push stream is idle for long stretches, and keepalive pings are how a node notices a
controller that vanished without closing the connection, and how the controller notices a
node that did (its host gone, its process stopped): that stream ends, the node no longer
counts as connected, and its stream's memory is freed. A gRPC server answers pings
that come more often than it allows (by default one per 5 minutes without data) with
``GOAWAY too_many_pings``, and the client reconnects: so the server's allowance is
derived here from the client's interval, never written down twice. The client must also
keep pinging while no data flows (``max_pings_without_data`` 0), or gRPC stops after two
pings, and bound the wait for an answer with ``ping_timeout_ms`` (gRPC 1.85 waits its
default minute for a keepalive ping despite ``keepalive_timeout_ms``); otherwise a dead
link goes unnoticed for minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

GrpcOptions = list[tuple[str, int]]


@dataclass(frozen=True)
class Keepalive:
    """Each end pings every ``time_ms`` and gives up ``timeout_ms`` after an unanswered ping."""

    time_ms: int = 30_000
    timeout_ms: int = 10_000

    def client_options(self) -> GrpcOptions:
        return [
            ("grpc.keepalive_time_ms", self.time_ms),
            ("grpc.keepalive_timeout_ms", self.timeout_ms),
            ("grpc.http2.ping_timeout_ms", self.timeout_ms),
            ("grpc.http2.max_pings_without_data", 0),
        ]

    def server_options(self) -> GrpcOptions:
        """Pings the nodes on the clients' schedule, and allows their pings at half their
        interval: margin for timer and network jitter."""
        return [
            *self.client_options(),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", self.time_ms // 2),
        ]


KEEPALIVE = Keepalive()
