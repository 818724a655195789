"""Gateway API HTTPRoute attached to Services (GAMMA) -> waypoint route rules.

Each match of each rule becomes its own rule, ranked by the Gateway API precedence
(Exact path > longest PathPrefix > RegularExpression, then method, most headers, most
query params; ties: oldest route, then ``namespace/name``, then rule and match order), so
routes.py can merge every route attached to a Service port into one first-match table.

PathPrefix matches whole path segments and ignores a trailing ``/``, while the waypoint's
``prefix`` is a plain string prefix (Istio's): PathPrefix ``/foo`` is sent as the regex
``(?P<prefix>/foo)(?:/.*)?``, whose ``prefix`` group tells the waypoint what a
ReplacePrefixMatch replaces (docs/waypoint.md, "How the waypoint evaluates...").
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Any

from controller.fields import ConfigObject, View, created, integer
from controller.hosts import ServiceIndex
from controller.quoting import quote
from controller.route_parts import Attachment, default_retry, regex
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)

KIND = "HTTPRoute"
API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
_CORE_GROUPS = ("", "core")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_PATH_RANKS = {"Exact": 3, "PathPrefix": 2, "RegularExpression": 1}
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_MAX_WEIGHT = 1_000_000
_HEADER_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier")
_FILTERS = (*_HEADER_FILTERS, "RequestRedirect", "URLRewrite", "RequestMirror", "CORS")
# A filter's type -> the field holding its settings.
_FILTER_FIELDS = {kind: kind[0].lower() + kind[1:] for kind in _FILTERS} | {
    "URLRewrite": "urlRewrite",
    "CORS": "cors",
}
# HTTPCORSFilter's maxAge when unset (Gateway API: 5 seconds).
_CORS_MAX_AGE = 5


def attachments(obj: ConfigObject, services: ServiceIndex) -> list[Attachment]:
    """The route's rules for each Service port it attaches to (Gateway parents ignored)."""
    spec = View.of(obj, "spec")
    spec.check_fields(("parentRefs", "hostnames", "rules"))
    parents = spec.views("parentRefs")
    # A consumer route may send traffic on to its Service's namespace without a ReferenceGrant.
    allowed = {obj.namespace} | {p.string("namespace", obj.namespace) for p in parents}
    rules = [
        _Rule(obj, services, allowed, rule, index) for index, rule in enumerate(spec.views("rules"))
    ]
    stamp = created(obj)
    out = []
    for parent in parents:
        parent.check_fields(("group", "kind", "namespace", "name", "sectionName", "port"))
        if (
            parent.string("kind", "Gateway") != "Service"
            or parent.string("group") not in _CORE_GROUPS
        ):
            log.debug("%s: %s: not a Service; not a mesh route", obj.describe(), parent.path)
            continue
        namespace = parent.string("namespace", obj.namespace)
        name = parent.string("name", required=True)
        service = services.get(namespace, name)
        if service is None:
            log.warning(
                "%s: %s: no Service %s/%s; not attached",
                obj.describe(),
                parent.path,
                namespace,
                quote(name),
            )
            continue
        port = parent.port("port")
        if section := parent.string("sectionName"):
            by_name = {p.name: p.port for p in service.ports}
            if section not in by_name:
                raise parent.error(
                    "sectionName", f"Service {namespace}/{name} has no port named {quote(section)}"
                )
            port = by_name[section]
        consumer = obj.namespace if namespace != obj.namespace else ""
        attachment = Attachment(
            f"{KIND} {obj.namespace}/{obj.name}", (namespace, name), port, consumer=consumer
        )
        for rule in rules:
            attachment.rules += rule.ranked(stamp, consumer)
        out.append(attachment)
    return out


class _Rule:
    """One HTTPRoute rule: what its matches share (filters, backends, timeouts)."""

    def __init__(
        self,
        obj: ConfigObject,
        services: ServiceIndex,
        namespaces: set[str],
        view: View,
        index: int,
    ) -> None:
        view.check_fields(
            ("name", "matches", "filters", "backendRefs", "timeouts", "retry"),
            ("sessionPersistence",),
        )
        self.obj, self.view, self.index, self.services = obj, view, index, services
        self.namespaces = namespaces
        self.template = mesh_pb2.HttpRouteRule(name=f"{KIND}/{obj.namespace}/{obj.name}#{index}")
        self.prefix_filter = ""  # the path of a ReplacePrefixMatch filter, if any
        for filter_view in view.views("filters"):
            self._filter(filter_view)
        self._timeouts_and_retry()
        self._backends()

    def ranked(
        self, stamp: datetime, consumer: str
    ) -> list[tuple[tuple[Any, ...], mesh_pb2.HttpRouteRule]]:
        out = []
        matches = self.view.views("matches") or [View(self.obj, f"{self.view.path}.matches[0]", {})]
        for match_index, match in enumerate(matches):
            rank, conditions = self._match(match)
            key = (*rank, stamp, f"{self.obj.namespace}/{self.obj.name}", self.index, match_index)
            rule = mesh_pb2.HttpRouteRule()
            rule.CopyFrom(self.template)
            rule.matches.append(conditions)
            rule.matches[0].source_namespace = consumer
            out.append((key, rule))
        return out

    def _match(self, match: View) -> tuple[tuple[int, ...], mesh_pb2.HttpRouteMatch]:
        """The precedence rank of ``match``, and the match."""
        match.check_fields(("path", "headers", "queryParams", "method"))
        path = match.view("path") or View(self.obj, match.at("path"), {})
        path.check_fields(("type", "value"))
        kind = path.string("type", "PathPrefix")
        value = path.string("value", "/")
        if kind not in _PATH_RANKS:
            raise path.error("type", f"{quote(kind)} is not one of: {', '.join(_PATH_RANKS)}")
        if kind != "RegularExpression" and not value.startswith("/"):
            raise path.error("value", f"{quote(value)} must start with /")
        if self.prefix_filter and kind != "PathPrefix":
            raise path.error(
                "type", f"{self.prefix_filter} (ReplacePrefixMatch) needs a PathPrefix match"
            )
        conditions = mesh_pb2.HttpRouteMatch(
            headers=[
                mesh_pb2.HttpHeaderMatch(name=name.lower(), value=value_match)
                for name, value_match in _first_by_name(match, "headers", lower=True)
            ],
            query_params=[
                mesh_pb2.HttpQueryMatch(name=name, value=value_match)
                for name, value_match in _first_by_name(match, "queryParams", lower=False)
            ],
            method=_method(match),
        )
        rank = (
            -_PATH_RANKS[kind],
            -len(value),
            -bool(conditions.method),
            -len(conditions.headers),
            -len(conditions.query_params),
        )
        if kind == "Exact":
            conditions.path.exact = value
        elif kind == "RegularExpression":
            conditions.path.regex = regex(path, "value", value)
        elif base := value.rstrip("/"):
            conditions.path.regex = f"(?P<prefix>{re.escape(base)})(?:/.*)?"
        else:
            conditions.path.prefix = "/"
        return rank, conditions

    def _filter(self, view: View) -> None:
        kinds = _FILTERS
        view.check_fields(("type", *_FILTER_FIELDS.values()), ("extensionRef",))
        kind = view.string("type", required=True)
        if kind not in kinds:
            raise view.error(
                "type", f"{quote(kind)} is not supported (supported: {', '.join(kinds)})"
            )
        body = view.view(_FILTER_FIELDS[kind])
        if body is None:
            raise view.error(_FILTER_FIELDS[kind], f"is required for type {kind}")
        rule = self.template
        if kind in _HEADER_FILTERS:
            target = rule.request_headers if kind == _HEADER_FILTERS[0] else rule.response_headers
            target.MergeFrom(_header_mutation(body))
        elif kind == "RequestRedirect":
            if rule.HasField("rewrite"):
                raise view.error("type", "RequestRedirect and URLRewrite cannot be used together")
            body.check_fields(("scheme", "hostname", "path", "port", "statusCode"))
            scheme = body.string("scheme")
            if scheme not in ("", "http", "https"):
                raise body.error("scheme", f"{quote(scheme)} is not one of: http, https")
            status = body.integer("statusCode", 302, 301, 308)
            if status not in _REDIRECT_CODES:
                raise body.error("statusCode", f"{status} is not one of: {_REDIRECT_CODES}")
            rule.redirect.SetInParent()
            rule.redirect.scheme, rule.redirect.status_code = scheme, status
            rule.redirect.hostname, rule.redirect.port = body.string("hostname"), body.port("port")
            rule.redirect.path, rule.redirect.prefix = self._path_modifier(body)
        elif kind == "URLRewrite":
            if rule.HasField("redirect"):
                raise view.error("type", "RequestRedirect and URLRewrite cannot be used together")
            body.check_fields(("hostname", "path"))
            rule.rewrite.SetInParent()
            rule.rewrite.hostname = body.string("hostname")
            rule.rewrite.path, rule.rewrite.prefix = self._path_modifier(body)
        elif kind == "CORS":
            rule.cors.CopyFrom(_cors(body))
        elif (mirror := self._mirror(body)).backend.service:
            rule.mirrors.append(mirror)

    def _path_modifier(self, body: View) -> tuple[str, str]:
        """(the ReplaceFullPath, the ReplacePrefixMatch); at most one is set."""
        path = body.view("path")
        if path is None:
            return "", ""
        path.check_fields(("type", "replaceFullPath", "replacePrefixMatch"))
        kind = path.string("type", required=True)
        if kind == "ReplaceFullPath":
            return path.string("replaceFullPath", required=True), ""
        if kind == "ReplacePrefixMatch":
            self.prefix_filter = body.path
            return "", path.string("replacePrefixMatch", "/")
        raise path.error(
            "type", f"{quote(kind)} is not one of: ReplaceFullPath, ReplacePrefixMatch"
        )

    def _mirror(self, body: View) -> mesh_pb2.HttpMirror:
        body.check_fields(("backendRef", "percent", "fraction"))
        ref = body.view("backendRef")
        if ref is None:
            raise body.error("backendRef", "is required")
        percent = body.number("percent", 100.0, 0, 100)
        if (fraction := body.view("fraction")) is not None:
            fraction.check_fields(("numerator", "denominator"))
            denominator = fraction.integer("denominator", 100, 1, 2**31 - 1)
            numerator = fraction.integer("numerator", 0, 0, denominator)
            percent = 100.0 * numerator / denominator
        backend = self._backend(ref, mirror=True)
        return mesh_pb2.HttpMirror(backend=backend, percent=percent)

    def _timeouts_and_retry(self) -> None:
        rule = self.template
        retry = self.view.view("retry")
        if retry is None:
            rule.retry.CopyFrom(default_retry())
        else:
            retry.check_fields(("codes", "attempts", "backoff"))
            codes = tuple(
                integer(self.obj, f"{retry.at('codes')}[{i}]", code, 0, 400, 599)
                for i, code in enumerate(retry.sequence("codes"))
            )
            attempts = retry.integer("attempts", 2, 0, 2**31 - 1)
            rule.retry.CopyFrom(default_retry(attempts, codes=codes))
            if (backoff := retry.duration("backoff")) is not None and rule.retry.attempts:
                rule.retry.backoff_base_seconds = backoff
                rule.retry.backoff_max_seconds = backoff * 10
        timeouts = self.view.view("timeouts")
        if timeouts is None:
            return
        timeouts.check_fields(("request", "backendRequest"))
        request = timeouts.duration("request") or 0.0
        backend = timeouts.duration("backendRequest") or 0.0
        if request and backend > request:
            raise timeouts.error("backendRequest", "must not be longer than request")
        rule.timeout_seconds = request
        rule.retry.per_try_timeout_seconds = backend

    def _backends(self) -> None:
        rule = self.template
        valid = 0
        for view in self.view.views("backendRefs"):
            view.check_fields(("group", "kind", "name", "namespace", "port", "weight", "filters"))
            weight = view.integer("weight", 1, 0, _MAX_WEIGHT)
            backend = self._backend(view, mirror=False)
            if weight == 0:
                continue
            backend.weight = weight
            for filter_view in view.views("filters"):
                kind = filter_view.string("type", required=True)
                if kind not in _HEADER_FILTERS:
                    raise filter_view.error(
                        "type",
                        f"{quote(kind)}: per-backend filters may be {' or '.join(_HEADER_FILTERS)}",
                    )
                filter_view.check_fields(
                    ("type", "requestHeaderModifier", "responseHeaderModifier")
                )
                body = filter_view.view(_FILTER_FIELDS[kind])
                if body is None:
                    raise filter_view.error(_FILTER_FIELDS[kind], f"is required for type {kind}")
                target = (
                    backend.request_headers
                    if kind == _HEADER_FILTERS[0]
                    else backend.response_headers
                )
                target.MergeFrom(_header_mutation(body))
            valid += backend.service != ""
            rule.backends.append(backend)
        if not rule.HasField("redirect") and valid == 0:
            # Gateway API: no backend with weight > 0, or none of them valid: 500.
            del rule.backends[:]
            rule.direct_status = 500

    def _backend(self, view: View, mirror: bool) -> mesh_pb2.HttpBackend:
        """The backend; ``service`` empty when the reference is invalid (a 500 share)."""
        group, kind = view.string("group"), view.string("kind", "Service")
        name = view.string("name", required=True)
        namespace = view.string("namespace", self.obj.namespace)
        port = view.port("port")
        if group not in _CORE_GROUPS or kind != "Service":
            return self._invalid(view, f"{kind} is not a Service", mirror)
        if not port:
            raise view.error("port", "is required for a Service backend")
        if namespace not in self.namespaces:
            return self._invalid(
                view,
                f"in namespace {namespace}: needs a ReferenceGrant, which ambimesh does not read",
                mirror,
            )
        service = self.services.get(namespace, name)
        if service is None:
            return self._invalid(view, f"no Service {namespace}/{quote(name)}", mirror)
        return mesh_pb2.HttpBackend(service=service.hostname, port=port)

    def _invalid(self, view: View, problem: str, mirror: bool) -> mesh_pb2.HttpBackend:
        log.warning(
            "%s: %s: %s; %s",
            self.obj.describe(),
            view.path,
            problem,
            "not mirrored" if mirror else "its share of requests is answered 500",
        )
        return mesh_pb2.HttpBackend()


def _method(match: View) -> str:
    method = match.string("method")
    if method and method not in _METHODS:
        raise match.error("method", f"{quote(method)} is not one of: {', '.join(_METHODS)}")
    return method


def _first_by_name(
    match: View, key: str, lower: bool
) -> list[tuple[str, mesh_pb2.HttpStringMatch]]:
    """Header / query param matches; of entries with one name only the first counts (spec)."""
    out: dict[str, mesh_pb2.HttpStringMatch] = {}
    for entry in match.views(key):
        entry.check_fields(("type", "name", "value"))
        name = entry.string("name", required=True)
        kind = entry.string("type", "Exact")
        value = entry.string("value")
        if kind == "Exact":
            value_match = mesh_pb2.HttpStringMatch(exact=value)
        elif kind == "RegularExpression":
            value_match = mesh_pb2.HttpStringMatch(regex=regex(entry, "value", value))
        else:
            raise entry.error("type", f"{quote(kind)} is not one of: Exact, RegularExpression")
        out.setdefault(name.lower() if lower else name, value_match)
    return list(out.items())


def _header_mutation(body: View) -> mesh_pb2.HttpHeaderMutation:
    body.check_fields(("set", "add", "remove"))
    mutation = mesh_pb2.HttpHeaderMutation(remove=[name.lower() for name in body.strings("remove")])
    for key, target in (("set", mutation.set), ("add", mutation.add)):
        for entry in body.views(key):
            entry.check_fields(("name", "value"))
            target[entry.string("name", required=True).lower()] = entry.string("value")
    return mutation


def _cors(body: View) -> mesh_pb2.HttpCors:
    """Gateway API's HTTPCORSFilter (experimental channel): an origin is ``*`` (any) or
    ``scheme://host[:port]`` whose host may start with a ``*`` label (any subdomains)."""
    body.check_fields(
        (
            *("allowOrigins", "allowCredentials", "allowMethods", "allowHeaders"),
            *("exposeHeaders", "maxAge"),
        )
    )
    cors = mesh_pb2.HttpCors(
        allow_methods=body.strings("allowMethods"),
        allow_headers=body.strings("allowHeaders"),
        expose_headers=body.strings("exposeHeaders"),
        max_age_seconds=body.integer("maxAge", _CORS_MAX_AGE, 1, 2**31 - 1),
        allow_credentials=body.boolean("allowCredentials"),
    )
    for index, origin in enumerate(body.strings("allowOrigins")):
        if origin == "*":
            cors.allow_origins.add(regex=".*")
        elif not re.fullmatch(r"[a-z][a-z0-9+.-]*://(\*\.)?[^*/]+", origin):
            raise body.error(
                f"allowOrigins[{index}]",
                f"{quote(origin)} is not * or scheme://host[:port] (host may start with *.)",
            )
        elif "://*." in origin:
            cors.allow_origins.add(regex=re.escape(origin).replace(r"\*", "[^/]+", 1))
        else:
            cors.allow_origins.add(exact=origin)
    return cors
