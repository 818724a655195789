"""Istio DestinationRule -> DestinationPolicy (load balancer, connection pool, outlier
detection, subsets) for the Service its ``host`` names.

A subset's ``trafficPolicy`` replaces the DestinationRule's section by section
(loadBalancer, connectionPool, outlierDetection), as istiod merges them. Settings a
waypoint does not implement (TLS origination, consistent hashing, port-level settings...)
are logged and ignored rather than rejected: they tune, they do not redirect traffic.
"""

from __future__ import annotations

import logging

from controller.fields import ConfigObject, View
from controller.hosts import ServiceIndex, ServiceKey
from controller.quoting import quote
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)

KIND = "DestinationRule"
API_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
_LOAD_BALANCERS = {
    "UNSPECIFIED": mesh_pb2.LEAST_REQUEST,
    "LEAST_REQUEST": mesh_pb2.LEAST_REQUEST,
    "LEAST_CONN": mesh_pb2.LEAST_REQUEST,
    "ROUND_ROBIN": mesh_pb2.ROUND_ROBIN,
    "RANDOM": mesh_pb2.RANDOM,
}
_INT32 = 2**31 - 1
# Istio's outlier detection defaults once the section is present (Envoy's, except 5xx).
_CONSECUTIVE_5XX, _INTERVAL, _BASE_EJECTION, _MAX_EJECTION_PERCENT = 5, 10.0, 30.0, 10


def destination_policy(
    obj: ConfigObject, services: ServiceIndex
) -> tuple[ServiceKey, mesh_pb2.DestinationPolicy] | None:
    """The policy and the Service it is for; None (logged) when ``host`` is no mesh Service."""
    spec = View.of(obj, "spec")
    spec.check_fields(("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"))
    _ignore(spec, ("workloadSelector",))
    host = spec.string("host", required=True)
    key = services.key_of(host, obj.namespace)
    service = None if key is None else services.get(*key)
    if key is None or service is None:
        log.warning(
            "%s: spec.host %s is not a Service of the mesh; ignored", obj.describe(), quote(host)
        )
        return None
    top = spec.view("trafficPolicy")
    policy = mesh_pb2.DestinationPolicy(
        service=service.hostname, name=obj.name, namespace=obj.namespace, policy=_policy(top)
    )
    seen: set[str] = set()
    for raw in spec.views("subsets"):
        raw.check_fields(("name", "labels", "trafficPolicy"))
        name = raw.string("name", required=True)
        if name in seen:
            raise raw.error("name", f"{quote(name)} is defined twice")
        seen.add(name)
        own = raw.view("trafficPolicy")
        merged = mesh_pb2.TrafficPolicy()
        merged.CopyFrom(policy.policy)
        if own is not None:
            specific = _policy(own)
            if own.has("loadBalancer"):
                merged.load_balancer = specific.load_balancer
            if own.has("connectionPool"):
                merged.connection_pool.CopyFrom(specific.connection_pool)
            if own.has("outlierDetection"):
                merged.outlier_detection.CopyFrom(specific.outlier_detection)
        policy.subsets.add(name=name, labels=raw.string_map("labels"), policy=merged)
    return key, policy


def _policy(view: View | None) -> mesh_pb2.TrafficPolicy:
    policy = mesh_pb2.TrafficPolicy()
    if view is None:
        return policy
    view.check_fields(
        (
            "loadBalancer",
            "connectionPool",
            "outlierDetection",
            "tls",
            "portLevelSettings",
            "tunnel",
            "proxyProtocol",
            "retryBudget",
        )
    )
    _ignore(view, ("portLevelSettings", "tunnel", "proxyProtocol", "retryBudget"))
    tls = view.view("tls")
    if tls is not None and tls.string("mode", "ISTIO_MUTUAL") not in ("ISTIO_MUTUAL", "DISABLE"):
        log.warning(
            "%s: %s: ignored: the waypoint reaches mesh endpoints over HBONE (mTLS) only",
            view.obj.describe(),
            tls.path,
        )
    if (lb := view.view("loadBalancer")) is not None:
        lb.check_fields(
            ("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup")
        )
        _ignore(lb, ("consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"))
        simple = lb.string("simple", "UNSPECIFIED")
        if simple not in _LOAD_BALANCERS:
            raise lb.error("simple", f"{quote(simple)} is not one of: {', '.join(_LOAD_BALANCERS)}")
        policy.load_balancer = _LOAD_BALANCERS[simple]
    if (pool := view.view("connectionPool")) is not None:
        policy.connection_pool.CopyFrom(_connection_pool(pool))
    if (outlier := view.view("outlierDetection")) is not None:
        policy.outlier_detection.CopyFrom(_outlier_detection(outlier))
    return policy


def _connection_pool(pool: View) -> mesh_pb2.ConnectionPool:
    pool.check_fields(("tcp", "http"))
    out = mesh_pb2.ConnectionPool()
    if (tcp := pool.view("tcp")) is not None:
        ignored: tuple[str, ...] = ("tcpKeepalive", "maxConnectionDuration", "idleTimeout")
        tcp.check_fields(("maxConnections", "connectTimeout", *ignored))
        _ignore(tcp, ignored)
        out.max_connections = tcp.integer("maxConnections", 0, 0, _INT32)
        out.connect_timeout_seconds = tcp.duration("connectTimeout") or 0.0
    if (http := pool.view("http")) is not None:
        known = ("http1MaxPendingRequests", "http2MaxRequests", "maxRetries")
        ignored = ("idleTimeout", "h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams")
        http.check_fields((*known, "maxRequestsPerConnection", *ignored))
        _ignore(http, ignored)
        out.max_pending_requests = http.integer("http1MaxPendingRequests", 0, 0, _INT32)
        out.max_requests = http.integer("http2MaxRequests", 0, 0, _INT32)
        out.max_retries = http.integer("maxRetries", 0, 0, _INT32)
        out.max_requests_per_connection = http.integer("maxRequestsPerConnection", 0, 0, _INT32)
    return out


def _outlier_detection(view: View) -> mesh_pb2.OutlierDetection:
    known = ("consecutive5xxErrors", "consecutiveGatewayErrors", "consecutiveErrors", "interval")
    ignored = (
        "minHealthPercent",
        "splitExternalLocalOriginErrors",
        "consecutiveLocalOriginFailures",
    )
    view.check_fields((*known, "baseEjectionTime", "maxEjectionPercent", *ignored))
    _ignore(view, ignored)
    # consecutiveErrors is the deprecated spelling of consecutive5xxErrors.
    errors = view.integer("consecutiveErrors", _CONSECUTIVE_5XX, 0, _INT32)
    interval = view.duration("interval")
    ejection = view.duration("baseEjectionTime")
    return mesh_pb2.OutlierDetection(
        consecutive_5xx_errors=view.integer("consecutive5xxErrors", errors, 0, _INT32),
        consecutive_gateway_errors=view.integer("consecutiveGatewayErrors", 0, 0, _INT32),
        interval_seconds=_INTERVAL if interval is None else interval,
        base_ejection_seconds=_BASE_EJECTION if ejection is None else ejection,
        max_ejection_percent=view.integer("maxEjectionPercent", _MAX_EJECTION_PERCENT, 0, 100),
    )


def _ignore(view: View, names: tuple[str, ...]) -> None:
    present = [name for name in names if view.has(name)]
    if present:
        log.warning(
            "%s: %s: %s not implemented by the waypoint; ignored",
            view.obj.describe(),
            view.path,
            ", ".join(present),
        )
