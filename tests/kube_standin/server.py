"""A stand-in Kubernetes API server, on loopback, for the controller's Kubernetes source.

No real API server can run on these machines, so this serves the parts of the API the
controller uses, in the JSON shapes the Kubernetes API reference documents:

- lists: ``GET /api/v1/pods`` (and ``/apis/GROUP/VERSION/PLURAL``) answer
  ``{"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": ..,
  "continue": ..}, "items": [..]}``, paginated by ``limit``/``continue``; items of
  built-in kinds carry no ``apiVersion``/``kind`` (as the real server sends them), CRD
  items do;
- watches: ``?watch=1&resourceVersion=R&allowWatchBookmarks=true&timeoutSeconds=N``, a
  chunked stream of one JSON event per line (``ADDED``/``MODIFIED``/``DELETED`` with the
  whole object, ``BOOKMARK`` with only ``metadata.resourceVersion``), every change after
  R in order, ended cleanly after ``timeoutSeconds``; one resourceVersion counter for all
  kinds, like etcd's revision;
- ``410 Gone``: after :meth:`StandinApi.compact`, a watch from an older resourceVersion
  is refused with HTTP 410 and a Status body; :meth:`StandinApi.expire_watches` sends an
  ``ERROR`` event whose object is a Status of code 410 to every open watch, as the real
  server does mid-watch;
- :meth:`StandinApi.drop_watches` writes half an event and closes the connection;
  :meth:`StandinApi.fail_next` answers the next requests with an error Status;
- a kind not registered answers 404 (a CRD that is not installed);
- ``GET /api/v1/namespaces/NS/pods/NAME``, and ``POST
  /apis/authentication.k8s.io/v1/tokenreviews`` answering from :attr:`StandinApi.tokens`
  as the API server's authenticator would (audiences checked, bound-token ``extra``);
- every request must carry ``Authorization: Bearer <the controller's token>`` (401).

It records every watch it served (:class:`WatchRecord`) so tests can check that a
client resumed exactly where it left off.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

JsonObject = dict[str, Any]
_INVALID = "[invalid bearer token, square/go-jose: error in cryptographic primitive]"
CONTROLLER_TOKEN = "controller-token"


@dataclass
class Collection:
    kind: str
    api_version: str
    plural: str
    namespaced: bool = True
    crd: bool = False  # list items of built-in kinds carry no apiVersion/kind; CRDs' do
    objects: dict[tuple[str, str], JsonObject] = field(default_factory=dict)


@dataclass
class Event:
    rv: int
    type: str
    plural: str
    obj: JsonObject


@dataclass
class WatchRecord:
    plural: str
    from_rv: int
    sent: list[int] = field(default_factory=list)  # resourceVersions of whole events sent
    bookmarks: list[int] = field(default_factory=list)
    ended: str = ""  # "timeout", "dropped", "gone", "client"


@dataclass
class TokenInfo:
    """What the API server knows of a token: whom it names, for which audiences."""

    username: str
    audiences: list[str]
    extra: dict[str, list[str]] = field(default_factory=dict)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))


class StandinApi:
    def __init__(self) -> None:
        self.collections: dict[tuple[str, str], Collection] = {}
        self.log: list[Event] = []
        self.rv = 100
        self.compacted = 0
        self.watches: list[WatchRecord] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.tokens: dict[str, TokenInfo] = {}
        self.token_reviews: list[JsonObject] = []
        self._changed = asyncio.Event()
        self._drop = asyncio.Event()
        self._expire = asyncio.Event()
        self._bookmark = asyncio.Event()
        self._failures: list[int] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- cluster state -----------------------------------------------------------------

    def add_kind(
        self, kind: str, api_version: str, plural: str, namespaced: bool = True, crd: bool = False
    ) -> None:
        self.collections[(api_version, plural)] = Collection(
            kind, api_version, plural, namespaced, crd
        )

    def put(self, obj: JsonObject) -> JsonObject:
        """Create or replace ``obj`` (ADDED or MODIFIED); returns the stored object."""
        coll = self._collection_of(obj)
        stored = copy.deepcopy(obj)
        meta = stored.setdefault("metadata", {})
        if coll.namespaced:
            meta.setdefault("namespace", "default")
        key = (meta.get("namespace", ""), meta["name"])
        old = coll.objects.get(key)
        meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        coll.objects[key] = stored
        self._record("MODIFIED" if old else "ADDED", coll, stored)
        return stored

    def delete(self, api_version: str, plural: str, namespace: str, name: str) -> None:
        coll = self.collections[(api_version, plural)]
        stored = coll.objects.pop((namespace, name))
        self.rv += 1
        stored = copy.deepcopy(stored)
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self._record("DELETED", coll, stored)

    def bookmark(self) -> None:
        """Every open watch that allows them gets a BOOKMARK at the current resourceVersion."""
        self._bookmark.set()
        self._bookmark = asyncio.Event()

    def compact(self) -> None:
        """History up to now is gone: a watch from an older resourceVersion gets 410."""
        self.compacted = self.rv

    def expire_watches(self) -> None:
        """Every open watch gets an ERROR event with a Status of code 410, then ends."""
        self.compact()
        self._expire.set()
        self._expire = asyncio.Event()

    def drop_watches(self) -> None:
        """Every open watch gets half an event, then its connection is closed."""
        self._drop.set()
        self._drop = asyncio.Event()

    def fail_next(self, count: int, status: int = 500) -> None:
        self._failures.extend([status] * count)

    def events(self, plural: str) -> list[Event]:
        return [e for e in self.log if e.plural == plural]

    def _collection_of(self, obj: JsonObject) -> Collection:
        for coll in self.collections.values():
            if coll.kind == obj["kind"] and coll.api_version == obj["apiVersion"]:
                return coll
        raise KeyError(f"no kind {obj['apiVersion']} {obj['kind']} registered")

    def _record(self, kind: str, coll: Collection, obj: JsonObject) -> None:
        self.log.append(Event(self.rv, kind, coll.plural, copy.deepcopy(obj)))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- serving -------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.method, request.path, query))
        if request.headers.get("Authorization") != f"Bearer {CONTROLLER_TOKEN}":
            return _status(401, "Unauthorized", "Unauthorized")
        if self._failures:
            code = self._failures.pop(0)
            return _status(code, "InternalError", f"injected failure ({code})")
        parts = [p for p in request.path.split("/") if p]
        if request.method == "POST" and parts == [
            "apis",
            "authentication.k8s.io",
            "v1",
            "tokenreviews",
        ]:
            return self._token_review(await request.json())
        if request.method != "GET" or len(parts) < 3:
            return _status(405, "MethodNotAllowed", "not served by the stand-in")
        api_version = parts[1] if parts[0] == "api" else "/".join(parts[1:3])
        rest = parts[2:] if parts[0] == "api" else parts[3:]
        if len(rest) == 4 and rest[0] == "namespaces":
            return self._get_one(api_version, rest[2], rest[1], rest[3])
        coll = self.collections.get((api_version, rest[0])) if len(rest) == 1 else None
        if coll is None:
            return _status(404, "NotFound", "the server could not find the requested resource")
        if query.get("watch") in ("1", "true"):
            return await self._watch(request, coll, query)
        return self._list(coll, query)

    def _get_one(self, api_version: str, plural: str, namespace: str, name: str) -> web.Response:
        coll = self.collections.get((api_version, plural))
        obj = coll.objects.get((namespace, name)) if coll else None
        if coll is None or obj is None:
            return _status(404, "NotFound", f'{plural} "{name}" not found')
        return web.json_response(_with_kind(coll, obj))

    def _list(self, coll: Collection, query: dict[str, str]) -> web.Response:
        items = [coll.objects[k] for k in sorted(coll.objects)]
        start = int(query.get("continue") or 0)
        limit = int(query.get("limit") or 0) or len(items) or 1
        page = items[start : start + limit]
        metadata: JsonObject = {"resourceVersion": str(self.rv)}
        if start + limit < len(items):
            metadata["continue"] = str(start + limit)
        body = {
            "kind": f"{coll.kind}List",
            "apiVersion": coll.api_version,
            "metadata": metadata,
            "items": [_with_kind(coll, obj) if coll.crd else obj for obj in page],
        }
        return web.json_response(body)

    async def _watch(
        self, request: web.Request, coll: Collection, query: dict[str, str]
    ) -> web.StreamResponse:
        from_rv = int(query.get("resourceVersion") or self.rv)
        if from_rv < self.compacted:
            return _status(410, "Expired", f"too old resource version: {from_rv} ({self.rv})")
        record = WatchRecord(coll.plural, from_rv)
        self.watches.append(record)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        deadline = asyncio.get_running_loop().time() + float(query.get("timeoutSeconds") or 1800)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        cursor, bookmark_due = from_rv, False
        try:
            while True:
                for event in self.log:
                    if event.rv > cursor and event.plural == coll.plural:
                        await response.write(_event_line(coll, event.type, event.obj))
                        record.sent.append(event.rv)
                        cursor = event.rv
                if bookmark_due:  # vouches for every change up to now: all were just sent
                    cursor, bookmark_due = self.rv, False
                    mark = {"metadata": {"resourceVersion": str(cursor)}}
                    await response.write(_event_line(coll, "BOOKMARK", mark))
                    record.bookmarks.append(cursor)
                signals = {
                    name: asyncio.ensure_future(signal.wait())
                    for name, signal in (
                        ("changed", self._changed),
                        ("bookmark", self._bookmark),
                        ("dropped", self._drop),
                        ("gone", self._expire),
                    )
                }
                timeout = max(0.0, deadline - asyncio.get_running_loop().time())
                await asyncio.wait(
                    signals.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                fired = {name for name, future in signals.items() if future.done()}
                for future in signals.values():
                    future.cancel()
                if "dropped" in fired:
                    record.ended = "dropped"
                    await response.write(b'{"type":"MODIFIED","object":{"kind":')
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if "gone" in fired:
                    record.ended = "gone"
                    await response.write(_gone_event(cursor, self.rv))
                    break
                bookmark_due = "bookmark" in fired and bookmarks
                if not fired:
                    record.ended = "timeout"
                    break
        except ConnectionResetError:  # the client went away
            record.ended = record.ended or "client"
            return response
        except asyncio.CancelledError:
            record.ended = record.ended or "client"
            raise
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    def _token_review(self, review: JsonObject) -> web.Response:
        self.token_reviews.append(review)
        spec = review.get("spec") or {}
        wanted = list(spec.get("audiences") or [])
        info = self.tokens.get(str(spec.get("token")))
        status: JsonObject = {"user": {}}
        if info is None:
            status["error"] = _INVALID
        elif wanted and not set(wanted) & set(info.audiences):
            status["error"] = (
                f"[invalid bearer token, token audiences {json.dumps(info.audiences)} is "
                f"invalid for the target audiences {json.dumps(wanted)}]"
            )
        else:
            namespace = info.username.split(":")[2]
            status = {
                "authenticated": True,
                "user": {
                    "username": info.username,
                    "uid": info.uid,
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{namespace}",
                        "system:authenticated",
                    ],
                    "extra": info.extra,
                },
                "audiences": [a for a in wanted if a in info.audiences] or info.audiences,
            }
        body = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(body, status=201)


def _with_kind(coll: Collection, obj: JsonObject) -> JsonObject:
    return {"apiVersion": coll.api_version, "kind": coll.kind, **obj}


def _event_line(coll: Collection, kind: str, obj: JsonObject) -> bytes:
    return json.dumps({"type": kind, "object": _with_kind(coll, obj)}).encode() + b"\n"


def _gone_event(cursor: int, now: int) -> bytes:
    status = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"too old resource version: {cursor} ({now})",
        "reason": "Expired",
        "code": 410,
    }
    return json.dumps({"type": "ERROR", "object": status}).encode() + b"\n"


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)
