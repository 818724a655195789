"""Istio VirtualService (for mesh Services) -> waypoint route rules, in the order written.

A VirtualService applies to the mesh when ``gateways`` is absent or lists ``mesh``; each
``hosts`` entry naming a Service of the mesh gets the rules. Rules keep their order (first
match wins); a rule without ``match`` matches everything. Subsets resolve to pod labels
through the DestinationRule of the destination's Service. A destination the mesh does not
know (no such Service or subset) becomes an invalid backend (empty ``service``), answered
500 by the waypoint; Istio answers 503 there, both refuse the request.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Mapping

from controller.fields import ConfigObject, View, created
from controller.hosts import ServiceIndex, ServiceKey
from controller.quoting import quote
from controller.route_parts import Attachment, default_retry, string_match, string_match_at
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)

KIND = "VirtualService"
API_VERSIONS = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
MESH_GATEWAY = "mesh"
_STRING_MATCH = ("exact", "prefix", "regex")
_RULE_FIELDS = (
    *("name", "match", "route", "redirect", "directResponse", "rewrite", "timeout", "retries"),
    *("fault", "mirror", "mirrors", "mirrorPercentage", "mirrorPercent", "headers"),
    "corsPolicy",
)
_MATCH_FIELDS = (
    *("name", "uri", "method", "headers", "port", "sourceLabels", "gateways", "queryParams"),
    *("withoutHeaders", "sourceNamespace", "statPrefix", "ignoreUriCase"),
)
# subsets(service key) -> {subset name: pod labels}
Subsets = Callable[[ServiceKey], Mapping[str, Mapping[str, str]]]


def attachments(obj: ConfigObject, services: ServiceIndex, subsets: Subsets) -> list[Attachment]:
    """The rules for each mesh Service the VirtualService's ``hosts`` name."""
    spec = View.of(obj, "spec")
    spec.check_fields(("hosts", "gateways", "http", "tcp", "tls", "exportTo"))
    gateways = spec.strings("gateways")
    if gateways and MESH_GATEWAY not in gateways:
        log.debug("%s: bound to gateways only, not to the mesh; ignored", obj.describe())
        return []
    if spec.has("tcp") or spec.has("tls"):
        log.warning("%s: tcp and tls routes are not implemented; ignored", obj.describe())
    ranked: list[tuple[tuple[int, ...], mesh_pb2.HttpRouteRule]] = []
    for index, view in enumerate(spec.views("http")):
        rules = _Rule(obj, services, subsets, view, f"{KIND}/{obj.namespace}/{obj.name}#{index}")
        ranked += [((index, n), rule) for n, rule in enumerate(rules.translated())]
    out = []
    for index, host in enumerate(spec.strings("hosts") or _implied_hosts(spec, services)):
        key = services.key_of(host, obj.namespace)
        if key is None or services.get(*key) is None:
            log.warning(
                "%s: spec.hosts[%d]: %s is not a Service of the mesh; ignored",
                obj.describe(),
                index,
                quote(host),
            )
            continue
        attachment = Attachment(f"{KIND} {obj.namespace}/{obj.name}", key, 0, list(ranked))
        attachment.age = (created(obj), f"{obj.namespace}/{obj.name}")
        out.append(attachment)
    return out


def _implied_hosts(spec: View, services: ServiceIndex) -> list[str]:
    """Without ``hosts`` (which Istio requires), the one Service all destinations name: the
    seed's canary VirtualService is written so, and means that Service's traffic."""
    named: dict[ServiceKey | None, str] = {}
    for rule in spec.views("http"):
        for route in rule.views("route"):
            destination = route.view("destination")
            if destination is not None and (host := destination.string("host")):
                named.setdefault(services.key_of(host, spec.obj.namespace), host)
    if len(named) != 1 or None in named:
        raise spec.error("hosts", "is required (the destinations do not all name one Service)")
    host = next(iter(named.values()))
    log.info(
        "%s: no spec.hosts: applies to %s, where its routes go", spec.obj.describe(), quote(host)
    )
    return [host]


class _Rule:
    """One ``http[]`` entry; ``translated()`` gives one rule, or one per match when a
    ``rewrite.uri`` must know whether its match was a prefix."""

    def __init__(
        self, obj: ConfigObject, services: ServiceIndex, subsets: Subsets, view: View, name: str
    ) -> None:
        view.check_fields(_RULE_FIELDS, ("delegate",))
        self.obj, self.services, self.subsets, self.view = obj, services, subsets, view
        self.rule = mesh_pb2.HttpRouteRule(name=name)
        if not (view.has("route") or view.has("redirect") or view.has("directResponse")):
            raise view.error("", "needs one of route, redirect, directResponse (as in Istio)")
        self._actions()
        self._policies()

    def translated(self) -> list[mesh_pb2.HttpRouteRule]:
        views = self.view.views("match")
        matches = [m for v in views if (m := self._match(v)) is not None]
        if views and not matches:
            return []  # every match is for gateways other than the mesh
        uri = self._rewrite_uri()
        if not uri:
            self.rule.matches.extend(matches)
            return [self.rule]
        out = []
        match_all = mesh_pb2.HttpRouteMatch(path=mesh_pb2.HttpStringMatch(prefix="/"))
        for match in matches or [match_all]:
            rule = mesh_pb2.HttpRouteRule()
            rule.CopyFrom(self.rule)
            rule.matches.append(match)
            # Istio: the value replaces the matched prefix, else the whole path.
            is_prefix = match.path.WhichOneof("kind") == "prefix"
            rule.rewrite.prefix, rule.rewrite.path = (uri, "") if is_prefix else ("", uri)
            out.append(rule)
        return out

    def _rewrite_uri(self) -> str:
        rewrite = self.view.view("rewrite")
        return "" if rewrite is None else rewrite.string("uri")

    def _match(self, view: View) -> mesh_pb2.HttpRouteMatch | None:
        view.check_fields(_MATCH_FIELDS, ("scheme", "authority"))
        gateways = view.strings("gateways")
        if gateways and MESH_GATEWAY not in gateways:
            return None
        if view.boolean("ignoreUriCase"):
            raise view.error("ignoreUriCase", "is not supported by ambimesh")
        match = mesh_pb2.HttpRouteMatch(
            port=view.port("port"),
            source_labels=view.string_map("sourceLabels"),
            source_namespace=view.string("sourceNamespace"),
        )
        if view.has("uri"):
            match.path.CopyFrom(string_match(view, "uri", _STRING_MATCH))
        if view.has("method"):
            method = string_match(view, "method", ("exact",))
            match.method = method.exact.upper()
        for key, invert in (("headers", False), ("withoutHeaders", True)):
            if (headers := view.view(key)) is not None:
                for name in map(str, headers.raw):
                    value = string_match(headers, name, _STRING_MATCH)
                    match.headers.add(name=name.lower(), value=value, invert=invert)
        if (params := view.view("queryParams")) is not None:
            for name in map(str, params.raw):
                match.query_params.add(name=name, value=string_match(params, name, _STRING_MATCH))
        return match

    def _actions(self) -> None:
        view, rule = self.view, self.rule
        destinations = view.views("route")
        if len(destinations) > 1 and not any(d.integer("weight", 0) for d in destinations):
            raise view.error("route", "weights of all destinations are 0: none gets traffic")
        for destination in destinations:
            destination.check_fields(("destination", "weight", "headers"))
            weight = 100 if len(destinations) == 1 else destination.integer("weight", 0)
            if weight == 0:
                continue  # Istio: a destination with weight 0 gets no traffic
            backend = self._backend(destination, "destination")
            backend.weight = weight
            if (headers := destination.view("headers")) is not None:
                backend.request_headers.CopyFrom(_mutation(headers, "request"))
                backend.response_headers.CopyFrom(_mutation(headers, "response"))
            rule.backends.append(backend)
        if (redirect := view.view("redirect")) is not None:
            redirect.check_fields(
                ("uri", "authority", "port", "scheme", "redirectCode"),
                ("derivePort", "uriRegexRedirect"),
            )
            rule.redirect.SetInParent()
            rule.redirect.path = redirect.string("uri")
            rule.redirect.hostname = redirect.string("authority")
            rule.redirect.port = redirect.port("port")
            rule.redirect.scheme = redirect.string("scheme")
            rule.redirect.status_code = redirect.integer("redirectCode", 301, 300, 399)
        if (direct := view.view("directResponse")) is not None:
            direct.check_fields(("status", "body"))
            rule.direct_status = direct.integer("status", 0, 200, 599)
            if not rule.direct_status:
                raise direct.error("status", "is required")
            rule.direct_body = _body(direct)
        if (rewrite := view.view("rewrite")) is not None:
            rewrite.check_fields(("uri", "authority"), ("uriRegexRewrite",))
            rule.rewrite.SetInParent()
            rule.rewrite.hostname = rewrite.string("authority")

    def _policies(self) -> None:
        view, rule = self.view, self.rule
        rule.timeout_seconds = view.duration("timeout") or 0.0
        retries = view.view("retries")
        if retries is None:
            rule.retry.CopyFrom(default_retry())
        else:
            retries.check_fields(
                ("attempts", "perTryTimeout", "retryOn", "backoff", "retryRemoteLocalities"),
                ("retryIgnorePreviousHosts",),
            )
            rule.retry.CopyFrom(_retry(retries))
        if (headers := view.view("headers")) is not None:
            headers.check_fields(("request", "response"))
            rule.request_headers.CopyFrom(_mutation(headers, "request"))
            rule.response_headers.CopyFrom(_mutation(headers, "response"))
        if (fault := view.view("fault")) is not None:
            rule.fault.CopyFrom(_fault(fault))
        if (cors := view.view("corsPolicy")) is not None:
            rule.cors.CopyFrom(_cors(cors))
        mirrors = [(view, "mirror", _percent(view, "mirrorPercentage", "mirrorPercent"))]
        mirrors += [
            (m, "destination", _percent(m, "percentage", "")) for m in view.views("mirrors")
        ]
        for mirror_view, key, percent in mirrors:
            if mirror_view is not view:
                mirror_view.check_fields(("destination", "percentage"))
            if mirror_view.has(key):
                backend = self._backend(mirror_view, key)
                if backend.service:
                    rule.mirrors.add(backend=backend, percent=percent)

    def _backend(self, view: View, key: str) -> mesh_pb2.HttpBackend:
        destination = view.view(key)
        if destination is None:
            raise view.error(key, "is required")
        destination.check_fields(("host", "subset", "port"))
        host = destination.string("host", required=True)
        subset = destination.string("subset")
        port = destination.view("port")
        number = 0
        if port is not None:
            port.check_fields(("number",))
            number = port.port("number")
        service_key = self.services.key_of(host, self.obj.namespace)
        service = None if service_key is None else self.services.get(*service_key)
        problem = ""
        if service_key is None or service is None:
            problem = f"{quote(host)} is not a Service of the mesh"
        elif subset and subset not in (known := self.subsets(service_key)):
            problem = f"no DestinationRule of {host} defines subset {quote(subset)}"
        if problem:
            log.warning(
                "%s: %s: %s; requests routed there are answered 500",
                self.obj.describe(),
                destination.path,
                problem,
            )
            return mesh_pb2.HttpBackend(subset=subset, port=number)
        assert service is not None and service_key is not None
        labels = known[subset] if subset else {}
        return mesh_pb2.HttpBackend(
            service=service.hostname, port=number, subset=subset, subset_labels=labels
        )


def _retry(view: View) -> mesh_pb2.HttpRetry:
    attempts = view.integer("attempts", 0, 0, 2**31 - 1)
    conditions: list[str] = []
    codes: list[int] = []
    for item in view.string("retryOn").split(","):
        item = item.strip()
        if item.isdigit():
            codes.append(int(item))
        elif item:
            conditions.append(item)
    retry = (
        default_retry(attempts, tuple(conditions), tuple(codes))
        if conditions or codes
        else default_retry(attempts)
    )
    if attempts:
        retry.per_try_timeout_seconds = view.duration("perTryTimeout") or 0.0
        if (backoff := view.duration("backoff")) is not None:
            retry.backoff_base_seconds, retry.backoff_max_seconds = backoff, backoff * 10
    return retry


def _fault(view: View) -> mesh_pb2.HttpFault:
    view.check_fields(("delay", "abort"))
    fault = mesh_pb2.HttpFault()
    if (delay := view.view("delay")) is not None:
        delay.check_fields(("fixedDelay", "percentage", "percent"), ("exponentialDelay",))
        fixed = delay.duration("fixedDelay")
        if fixed is None:
            raise delay.error("fixedDelay", "is required")
        fault.delay_seconds = fixed
        fault.delay_percent = _percent(delay, "percentage", "percent")
    if (abort := view.view("abort")) is not None:
        abort.check_fields(("httpStatus", "percentage"), ("grpcStatus", "http2Error"))
        fault.abort_status = abort.integer("httpStatus", 0, 200, 599)
        if not fault.abort_status:
            raise abort.error("httpStatus", "is required")
        fault.abort_percent = _percent(abort, "percentage", "")
    return fault


def _cors(view: View) -> mesh_pb2.HttpCors:
    """Istio's corsPolicy; the deprecated ``allowOrigin`` strings are exact origins, ``*``
    any origin, as Istio converts them."""
    view.check_fields(
        (
            *("allowOrigins", "allowOrigin", "allowMethods", "allowHeaders", "exposeHeaders"),
            *("maxAge", "allowCredentials", "unmatchedPreflights"),
        )
    )
    cors = mesh_pb2.HttpCors(
        allow_methods=view.strings("allowMethods"),
        allow_headers=view.strings("allowHeaders"),
        expose_headers=view.strings("exposeHeaders"),
        max_age_seconds=round(view.duration("maxAge") or 0),
        allow_credentials=view.boolean("allowCredentials"),
    )
    for origin_view in view.views("allowOrigins"):
        cors.allow_origins.append(string_match_at(origin_view, _STRING_MATCH))
    for origin in view.strings("allowOrigin"):
        match = {"regex": ".*"} if origin == "*" else {"exact": origin}
        cors.allow_origins.add(**match)
    preflights = view.string("unmatchedPreflights", "FORWARD")
    if preflights not in ("FORWARD", "IGNORE"):
        raise view.error("unmatchedPreflights", f"is FORWARD or IGNORE, not {quote(preflights)}")
    cors.ignore_unmatched_preflights = preflights == "IGNORE"
    return cors


def _percent(view: View, key: str, legacy: str) -> float:
    """Istio's ``{value: 0-100}`` percentage (or a deprecated integer field); 100 when unset."""
    if legacy and view.has(legacy):
        return float(view.integer(legacy, 100, 0, 100))
    percentage = view.view(key)
    if percentage is None:
        return 100.0
    percentage.check_fields(("value",))
    return percentage.number("value", 100.0, 0, 100)


def _mutation(view: View, key: str) -> mesh_pb2.HttpHeaderMutation:
    headers = view.view(key)
    if headers is None:
        return mesh_pb2.HttpHeaderMutation()
    headers.check_fields(("set", "add", "remove"))
    return mesh_pb2.HttpHeaderMutation(
        set={k.lower(): v for k, v in headers.string_map("set").items()},
        add={k.lower(): v for k, v in headers.string_map("add").items()},
        remove=[name.lower() for name in headers.strings("remove")],
    )


def _body(direct: View) -> str:
    body = direct.view("body")
    if body is None:
        return ""
    body.check_fields(("string", "bytes"))
    if body.has("bytes"):
        try:
            return base64.b64decode(body.string("bytes"), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise body.error("bytes", "must be base64 of UTF-8 text") from None
    return body.string("string")
