"""h2's per-connection SETTINGS state and HPACK tables, in lists instead of deques.

h2 keeps every setting of both Settings objects of a connection (ours and the peer's) as a
`collections.deque` of values awaiting acknowledgement: about sixteen deques per
connection, each ~600 bytes for its first block although it nearly always holds one
value. As lists (a deque's `popleft` is all h2 needs besides list operations) that is
~11 KiB less per HBONE connection and end, every HBONE connection a ztunnel holds.
The same for the dynamic tables of HPACK's encoder and decoder (two deques per connection
and end, ~1.5 KiB): a few entries each, so a list's insert at the front costs nothing.
"""

from __future__ import annotations

import collections
from typing import Any

from h2.settings import Settings
from hpack.table import HeaderTable


class SettingValues(list[Any]):
    """What h2 expects of a setting's queue of values: a list with `popleft`."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class TableEntries(list[Any]):
    """What hpack's `HeaderTable` expects of its dynamic entries: a list with `appendleft`
    (newest first; eviction pops the oldest from the end)."""

    __slots__ = ()

    def appendleft(self, entry: Any) -> None:
        self.insert(0, entry)


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
    _install_tables()
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


def _install_tables() -> None:
    """HPACK tables made from now on keep their entries in a `TableEntries` (left alone if
    this hpack keeps them otherwise)."""
    if type(HeaderTable().dynamic_entries) is not collections.deque:
        return
    init = HeaderTable.__init__

    def __init__(self: HeaderTable) -> None:
        init(self)
        self.dynamic_entries = TableEntries()  # type: ignore[assignment]

    HeaderTable.__init__ = __init__  # type: ignore[method-assign]
