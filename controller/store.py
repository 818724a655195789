"""The configuration store: one mutator, versioned immutable snapshots, change waits.

Everything the push stream sends comes from a :class:`Snapshot`; a snapshot never changes
after it is published, so a reader holding one sees a consistent configuration however
long it takes to send it. Subscribers do not queue every version: a slow one wakes up,
takes the newest snapshot and gets a single delta from what it last had.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.api import mesh_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    serial: int
    resources: Mapping[str, mesh_pb2.Resource]
    # When it became current (time.monotonic()): how long nodes took to apply it.
    published: float = field(default_factory=time.monotonic, compare=False)

    @property
    def version(self) -> str:
        return str(self.serial)


@dataclass(frozen=True)
class Delta:
    changed: list[mesh_pb2.Resource]
    removed: list[str]


def diff(old: Snapshot, new: Snapshot) -> Delta:
    """What turns ``old`` into ``new``: resources added or changed, keys removed. A resource
    unchanged between snapshots is the same object in both (see :meth:`Store.replace`),
    which costs no comparison here."""
    changed = [
        r
        for key, r in sorted(new.resources.items())
        if (was := old.resources.get(key)) is not r and was != r
    ]
    removed = sorted(key for key in old.resources if key not in new.resources)
    return Delta(changed, removed)


class Store:
    """Holds the current snapshot; call :meth:`replace` from the event loop's thread."""

    def __init__(self) -> None:
        self._current = Snapshot(0, MappingProxyType({}))
        self._changed = asyncio.Event()

    @property
    def current(self) -> Snapshot:
        return self._current

    def replace(self, resources: Mapping[str, mesh_pb2.Resource]) -> Snapshot:
        """Publish ``resources`` as the new configuration; no new version if nothing changed.

        The resources are copied so a caller mutating its messages later cannot change a
        published snapshot; one equal to the published one keeps the published copy, so a
        change to a few of 10,000 resources copies a few, and unchanged resources are the
        same objects from one snapshot to the next.
        """
        published = self._current.resources
        frozen: dict[str, mesh_pb2.Resource] = {}
        same = len(resources) == len(published)
        for key, resource in resources.items():
            if key != resource.key:
                raise ValueError(f"resource stored under {key!r} has key {resource.key!r}")
            old = published.get(key)
            if old is not None and old == resource:
                frozen[key] = old
                continue
            same = False
            copy = mesh_pb2.Resource()
            copy.CopyFrom(resource)
            frozen[key] = copy
        if same:
            return self._current
        self._current = Snapshot(self._current.serial + 1, MappingProxyType(frozen))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        log.info("configuration version %s: %d resources", self._current.version, len(frozen))
        return self._current

    async def wait_newer(self, serial: int) -> Snapshot:
        """The current snapshot as soon as its serial is greater than ``serial``."""
        while self._current.serial <= serial:
            await self._changed.wait()
        return self._current
