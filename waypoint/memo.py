"""Values the request path derives from one configuration's objects (a route's retry
policy, a backend's endpoints, the peers of a request), computed once per configuration
instead of once per request.

Keyed by the identity of the objects they come from: a configuration is built whole and
swapped (waypoint/state.py), so its objects do not change while it is in force. Each entry
holds those objects, so their ids cannot be reused by others while it is cached. A new
configuration, or ``limit`` entries, starts the memo afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

LIMIT = 4096


class ConfigMemo(Generic[V]):
    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._values: dict[Hashable, tuple[tuple[object, ...], V]] = {}
        self._config: object = None

    def get(
        self,
        config: object,
        objects: tuple[object, ...],
        extra: Hashable,
        compute: Callable[[], V],
    ) -> V:
        """``compute()``, remembered for ``objects`` (by identity) and ``extra`` (by value)
        while ``config`` is the configuration in force."""
        if config is not self._config or len(self._values) >= self._limit:
            self._values.clear()
            self._config = config
        key = (tuple(map(id, objects)), extra)
        cached = self._values.get(key)
        if cached is not None:
            return cached[1]
        value = compute()
        self._values[key] = (objects, value)
        return value

    def __len__(self) -> int:
        return len(self._values)
