"""User values in error messages, cut short.

A config value can be megabytes long, or (through YAML aliases) a structure that expands
to billions of items when printed: a plain ``repr`` in an error message would flood the log
or never finish. Both helpers take time and space bounded by :data:`LIMIT`, whatever they get.
"""

from __future__ import annotations

import reprlib

LIMIT = 100

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 4
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = LIMIT


def quote(value: object) -> str:
    """``repr(value)`` of at most about :data:`LIMIT` characters, marked where it was cut."""
    if isinstance(value, str):
        return repr(value) if len(value) <= LIMIT else f"{value[:LIMIT]!r}…({len(value)} chars)"
    text = _REPR.repr(value)
    return text if len(text) <= LIMIT else f"{text[:LIMIT]}…"


def clip(text: str) -> str:
    """``text`` (a name or key shown unquoted) cut to :data:`LIMIT` characters, marked if cut."""
    return text if len(text) <= LIMIT else f"{text[:LIMIT]}…({len(text)} chars)"
