"""Envoy as the waypoint: the reference ambimesh's waypoint is measured against.

It takes the waypoint's place in the mesh (same pod role, same ztunnels on both sides),
built the way Istio builds its Envoy waypoint, with static config instead of xDS:

- ``connect_terminate`` on ``<pod ip>:15008``: mTLS 1.3 with ALPN h2 and the waypoint's
  SPIFFE certificate, any mesh identity accepted as caller; an HTTP/2 connection manager
  terminates each HBONE ``CONNECT`` and hands the stream's bytes to ...
- ``main_internal`` (an Envoy internal listener): the HTTP connection manager with the
  routes (:func:`routes`, the same rules as the ambimesh side's VirtualService), Istio's
  default retry policy, a JSON access log line per request and a generated
  ``x-request-id``; the routed cluster's one endpoint is ...
- ``connect_originate`` (internal listener): ``tcp_proxy`` with ``tunneling_config``, so
  each upstream HTTP/1.1 connection is a ``CONNECT`` (``:authority`` = the endpoint's
  ``ip:port``) on one pooled mTLS h2 connection to the server pod's 15008, i.e. its
  ztunnel, checked against the server's SPIFFE ID.

One worker (``bench.envoy.argv``), as the ambimesh waypoint runs one event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.envoy import (
    HBONE_PORT,
    Config,
    TlsFiles,
    admin,
    downstream_tls,
    hbone_cluster,
    socket_address,
    tls_context,
)

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network"
    ".http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
MAIN, ORIGINATE = "main_internal", "connect_originate"
# istiod's retry.DefaultPolicy (1.24+: no retry on a 503 of the app), which the controller
# gives the ambimesh waypoint's routes that set none.
ISTIO_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled"
ISTIO_RETRIES = 2
# The keys of the ambimesh waypoint's JSON access line that Envoy has a command for.
ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "authority": "%REQ(:AUTHORITY)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_request_attempt_count": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "route_name": "%ROUTE_NAME%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}  # no principals: main_internal does not see the HBONE connection's TLS


@dataclass(frozen=True)
class Route:
    """One rule, first match wins: requests carrying ``header`` (name, exact value), or
    every request when it is None, go to the one backend."""

    name: str
    header: tuple[str, str] | None = None


@dataclass(frozen=True)
class Upstream:
    """The Service's one endpoint and what its ztunnel presents."""

    address: str
    port: int
    identity: str  # SPIFFE URI


def _internal(name: str) -> Config:
    return {"envoy_internal_address": {"server_listener_name": name}}


def _internal_cluster(name: str, listener: str) -> Config:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _internal(listener)}}]}],
        },
    }


def _route(route: Route) -> Config:
    match: Config = {"prefix": "/"}
    if route.header is not None:
        name, value = route.header
        match["headers"] = [{"name": name, "string_match": {"exact": value}}]
    return {
        "name": route.name,
        "match": match,
        "route": {
            "cluster": "backend",
            "timeout": "0s",  # Istio: no route timeout unless the VirtualService sets one
            "retry_policy": {
                "retry_on": ISTIO_RETRY_ON,
                "num_retries": ISTIO_RETRIES,
                "retry_host_predicate": [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.retry.host"
                            ".previous_hosts.v3.PreviousHostsPredicate"
                        },
                    }
                ],
                "host_selection_retry_max_attempts": "5",
            },
        },
    }


def _connect_terminate(listen_ip: str, tls: TlsFiles, trust_domain: str) -> Config:
    context = tls_context(tls, f"spiffe://{trust_domain}/", match="prefix")
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "connect_terminate",
        "codec_type": "HTTP2",
        "stream_idle_timeout": "0s",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "name": "connect_terminate",
            "virtual_hosts": [
                {
                    "name": "connect_terminate",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": MAIN,
                                "timeout": "0s",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [ROUTER],
    }
    return {
        "name": "connect_terminate",
        "address": socket_address(listen_ip, HBONE_PORT),
        "filter_chains": [
            {
                "transport_socket": downstream_tls(context),
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ],
            }
        ],
    }


def _main_internal(routes: list[Route], access_log: Path) -> Config:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": MAIN,
        "codec_type": "AUTO",
        "route_config": {
            "name": "backend",
            "virtual_hosts": [
                {"name": "backend", "domains": ["*"], "routes": [_route(r) for r in routes]}
            ],
        },
        "http_filters": [ROUTER],
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3"
                    ".FileAccessLog",
                    "path": str(access_log),
                    "log_format": {"json_format": ACCESS_LOG_FORMAT},
                },
            }
        ],
    }
    return {
        "name": MAIN,
        "internal_listener": {},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _connect_originate(upstream: Upstream) -> Config:
    return {
        "name": ORIGINATE,
        "internal_listener": {},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network"
                            ".tcp_proxy.v3.TcpProxy",
                            "stat_prefix": ORIGINATE,
                            "cluster": "hbone",
                            "tunneling_config": {"hostname": f"{upstream.address}:{upstream.port}"},
                            "idle_timeout": "3600s",
                        },
                    }
                ]
            }
        ],
    }


def config(
    listen_ip: str,
    tls: TlsFiles,
    routes: list[Route],
    upstream: Upstream,
    access_log: Path,
    trust_domain: str = "cluster.local",
) -> Config:
    """The whole bootstrap of one Envoy waypoint serving ``routes`` to ``upstream``."""
    hbone = hbone_cluster(upstream.address, tls, upstream.identity)
    return {
        "node": {"id": "bench-envoy-waypoint", "cluster": "bench"},
        "admin": admin(),
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.bootstrap"
                    ".internal_listener.v3.InternalListener"
                },
            }
        ],
        "static_resources": {
            "listeners": [
                _connect_terminate(listen_ip, tls, trust_domain),
                _main_internal(routes, access_log),
                _connect_originate(upstream),
            ],
            "clusters": [
                _internal_cluster(MAIN, MAIN),
                _internal_cluster("backend", ORIGINATE),
                hbone,
            ],
        },
    }
