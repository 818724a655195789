"""h2's per-connection SETTINGS state, in lists instead of deques.

h2 keeps every setting of both Settings objects of a connection (ours and the peer's) as a
`collections.deque` of values awaiting acknowledgement: about sixteen deques per
connection, each ~600 bytes for its first block although it nearly always holds one
value. As lists (a deque's `popleft` is all h2 needs besides list operations) that is
~11 KiB less per HBONE connection and end, every HBONE connection a ztunnel holds.
"""

from __future__ import annotations

import collections
from typing import Any

from h2.settings import Settings


class SettingValues(list[Any]):
    """What h2 expects of a setting's queue of values: a list with `popleft`."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def _compact(table: dict[Any, Any], key: Any) -> None:
    values = table[key]
    if type(values) is collections.deque:
        table[key] = SettingValues(values)


def _supported() -> bool:
    """h2 still keeps its values as checked here (else leave it alone)."""
    table = getattr(Settings(), "_settings", None)
    return isinstance(table, dict) and all(type(v) is collections.deque for v in table.values())


def install() -> bool:
    """Make every h2 `Settings` created from now on compact, also after a new setting is
    stored; False (nothing changed) if this h2 keeps its settings otherwise."""
    if getattr(Settings, "_compact_installed", False):
        return True
    if not _supported():
        return False
    init, setitem = Settings.__init__, Settings.__setitem__

    def __init__(self: Settings, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        for key in self._settings:
            _compact(self._settings, key)

    def __setitem__(self: Settings, key: Any, value: int) -> None:
        setitem(self, key, value)
        _compact(self._settings, key)

    Settings.__init__ = __init__  # type: ignore[method-assign]
    Settings.__setitem__ = __setitem__  # type: ignore[method-assign]
    Settings._compact_installed = True  # type: ignore[attr-defined]
    return True
