"""List + watch of one kind, kept as a local store: client-go's reflector, small.

The contract that makes the store exact (no event lost, none applied twice):

- A list returns every object and the collection's ``resourceVersion``; the store is
  replaced by it whole (objects deleted while we were not watching disappear here).
- A watch from resourceVersion R delivers every change after R, in order. Each event moves
  our resourceVersion to its object's, and so do BOOKMARK events (``allowWatchBookmarks``),
  which carry no change: they let a quiet kind resume from a recent point.
- When a watch ends (the server's ``timeoutSeconds``, a dropped connection, a timeout), the
  next one starts from the last resourceVersion we applied: nothing before it again,
  nothing after it skipped.
- ``410 Gone`` (HTTP status at watch start, or an ERROR event with a Status of code 410
  mid-stream) means the server no longer has history back to our resourceVersion: re-list.

Failures back off exponentially with jitter (:class:`Backoff`), so a restarted API server
is not met by every controller at once. A CRD that is not installed (404 on list) is
skipped with one warning and looked for again every :data:`ABSENT_RETRY` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from controller.sources.kubernetes_api import ApiError, JsonObject, KubeApi

log = logging.getLogger(__name__)

PAGE_SIZE = 500
ABSENT_RETRY = 60.0
# The server ends each watch after a random 5-10 minutes (client-go does the same), so
# watches of many controllers do not all restart at once.
WATCH_SECONDS = (300, 600)
# Bookmarks come about once a minute; a watch silent for longer than this is dead.
READ_TIMEOUT_MARGIN = 30.0
# A watch that ends cleanly this soon having delivered nothing is a misbehaving server,
# not a timeout: back off instead of spinning.
SHORT_WATCH = 1.0
HTTP_FORBIDDEN = 403
HTTP_NOT_FOUND = 404
HTTP_GONE = 410

Key = tuple[str, str]


@dataclass(frozen=True)
class Kind:
    """A kind to watch: its ``kind``, the apiVersions to try (preferred first), its plural."""

    kind: str
    api_versions: tuple[str, ...]
    plural: str
    optional: bool = False  # a CRD: may not be installed

    def path(self, api_version: str) -> str:
        prefix = "/api" if api_version == "v1" else "/apis"
        return f"{prefix}/{api_version}/{self.plural}"


@dataclass
class Backoff:
    """``base`` doubling per failure in a row up to ``cap``, each +-``jitter`` of itself."""

    base: float = 0.5
    cap: float = 30.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return delay * self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def reset(self) -> None:
        self.failures = 0


class Gone(Exception):
    """Our resourceVersion is too old for the server: re-list."""


class NotInstalled(Exception):
    """No apiVersion of an optional kind is served (its CRD is not installed)."""


class Reflector:
    """Keeps :attr:`objects` equal to the server's objects of one kind; calls ``on_change``
    after every change to them. :attr:`synced` is set once the first list is in."""

    def __init__(
        self,
        api: KubeApi,
        kind: Kind,
        on_change: Callable[[], None],
        backoff: Backoff | None = None,
        page_size: int = PAGE_SIZE,
        watch_seconds: tuple[int, int] = WATCH_SECONDS,
        absent_retry: float = ABSENT_RETRY,
    ) -> None:
        self.kind = kind
        self.objects: dict[Key, JsonObject] = {}
        self.resource_version = ""
        self.api_version = kind.api_versions[0]
        self.synced = asyncio.Event()
        self._api = api
        self._on_change = on_change
        self._backoff = backoff or Backoff()
        self._page_size = page_size
        self._watch_seconds = watch_seconds
        self._absent_retry = absent_retry
        self._absent_warned = False

    async def run(self) -> None:
        """List, then watch from where the list or the last event left off; forever."""
        listed = False
        while True:
            try:
                if not listed:
                    await self._list()
                    listed = True
                    self._backoff.reset()
                await self._watch()
            except Gone:
                log.info("%s: resourceVersion %s expired; re-listing", self, self.resource_version)
                listed = False
            except NotInstalled:
                listed = False
                await asyncio.sleep(self._absent_retry)
            except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as e:
                delay = self._backoff.next_delay()
                log.warning(
                    "%s: %s; retrying in %.2f s", self, _describe(e, self.kind.plural), delay
                )
                await asyncio.sleep(delay)

    def __str__(self) -> str:
        return f"watch {self.kind.plural}"

    async def _list(self) -> None:
        for api_version in _preferred_first(self.kind.api_versions, self.api_version):
            try:
                items, version = await self._list_pages(api_version)
            except ApiError as e:
                if e.status == HTTP_NOT_FOUND and self.kind.optional:
                    continue
                raise
            if self._absent_warned:
                log.info("%s: now served as %s", self, api_version)
            self._absent_warned = False
            self.api_version = api_version
            self._replace(items, version)
            return
        self._absent()

    async def _list_pages(self, api_version: str) -> tuple[list[JsonObject], str]:
        """Every item, following ``continue`` tokens; an expired token starts over."""
        items: list[JsonObject] = []
        query = {"limit": str(self._page_size)}
        while True:
            try:
                page = await self._api.get(self.kind.path(api_version), query)
            except ApiError as e:
                if e.status != HTTP_GONE or "continue" not in query:
                    raise
                items, query = [], {"limit": str(self._page_size)}
                continue
            metadata = page.get("metadata") or {}
            items.extend(_item(self.kind, api_version, raw) for raw in page.get("items") or [])
            token = metadata.get("continue")
            if not token:
                return items, str(metadata.get("resourceVersion", ""))
            query = {"limit": str(self._page_size), "continue": str(token)}

    def _absent(self) -> None:
        if not self._absent_warned:
            log.warning(
                "%s: not served (is its CRD installed?); skipping it, looking again every %.0f s",
                self,
                self._absent_retry,
            )
            self._absent_warned = True
        self._replace([], "")
        raise NotInstalled()

    def _replace(self, items: list[JsonObject], version: str) -> None:
        objects = {_key(o): o for o in items}
        self.resource_version = version
        changed = objects != self.objects
        self.objects = objects
        self.synced.set()
        if changed:
            self._on_change()

    async def _watch(self) -> None:
        seconds = random.randint(*self._watch_seconds)
        query = {
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        started, events = time.monotonic(), 0
        path = self.kind.path(self.api_version)
        try:
            async for event in self._api.watch(path, query, seconds + READ_TIMEOUT_MARGIN):
                self._apply(event)
                events += 1
                self._backoff.reset()
        except ApiError as e:
            if e.status == HTTP_GONE:
                raise Gone() from None
            raise
        if events == 0 and time.monotonic() - started < SHORT_WATCH:
            raise ApiError(0, "the watch ended at once with no event")

    def _apply(self, event: JsonObject) -> None:
        kind, raw = event.get("type"), event.get("object")
        if not isinstance(raw, dict):
            raise ValueError(f"watch event {kind!r} without an object")
        if kind == "ERROR":
            code = int(raw.get("code") or 0)
            if code == HTTP_GONE:
                raise Gone()
            raise ApiError(code, str(raw.get("message") or raw.get("reason") or raw))
        version = str((raw.get("metadata") or {}).get("resourceVersion", ""))
        if kind == "BOOKMARK":
            self.resource_version = version or self.resource_version
            return
        obj = _item(self.kind, self.api_version, raw)
        if kind in ("ADDED", "MODIFIED"):
            self.objects[_key(obj)] = obj
        elif kind == "DELETED":
            self.objects.pop(_key(obj), None)
        else:
            log.warning("%s: ignoring a watch event of type %r", self, kind)
            return
        self.resource_version = version or self.resource_version
        self._on_change()


def _item(kind: Kind, api_version: str, raw: Any) -> JsonObject:
    """The object as users write it: list items of built-in kinds carry no apiVersion/kind."""
    if not isinstance(raw, dict) or not isinstance(raw.get("metadata"), dict):
        raise ValueError(f"{kind.plural}: an item without metadata")
    return {**raw, "apiVersion": api_version, "kind": kind.kind}


def _key(obj: JsonObject) -> Key:
    metadata = obj["metadata"]
    return str(metadata.get("namespace", "")), str(metadata.get("name", ""))


def _preferred_first(versions: tuple[str, ...], current: str) -> list[str]:
    return [current, *(v for v in versions if v != current)]


def _describe(e: Exception, plural: str) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, ApiError) and e.status == HTTP_FORBIDDEN:
        return f"{text} (RBAC: the controller's service account needs list and watch on {plural})"
    return text
