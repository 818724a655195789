"""Reading fields of untrusted Kubernetes-style objects, with errors naming where.

Every translator walks nested YAML (lists of mappings of lists...). :class:`View` wraps one
mapping with its dotted path, so a mistyped value anywhere becomes a ``ConfigError``
naming the file, the object and the exact field (``spec.http[0].route[1].weight``),
never a ``KeyError`` or ``TypeError`` from deep inside a translator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from controller.quoting import clip, quote

# Go-style durations as Kubernetes and Istio users write them: "10s", "1.5s", "100ms", "1m30s".
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:h|ms|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
OLDEST = datetime.min.replace(tzinfo=UTC)


class ConfigObject(Protocol):
    """What translation needs of the object being translated (controller.translate._Obj)."""

    source: str
    kind: str
    namespace: str
    name: str

    def ref(self) -> str: ...

    def describe(self) -> str: ...

    def error(self, path: str, problem: str) -> ValueError: ...

    def get(self, path: str, expected: type | tuple[type, ...], default: Any = None) -> Any: ...

    def labels(self, path: str) -> dict[str, str]: ...


class View:
    """One mapping inside ``obj`` at ``path``; typed getters raise errors naming the field."""

    def __init__(self, obj: ConfigObject, path: str, raw: Mapping[str, Any]) -> None:
        self.obj = obj
        self.path = path
        self.raw = raw

    @classmethod
    def of(cls, obj: ConfigObject, path: str) -> View:
        return cls(obj, path, obj.get(path, Mapping, {}))

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ValueError:
        return self.obj.error(self.at(key) if key else self.path, problem)

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def check_fields(self, known: tuple[str, ...], unsupported: tuple[str, ...] = ()) -> None:
        """Unknown fields are typos; ``unsupported`` ones are real but not implemented here."""
        for key in self.raw:
            if key in unsupported and self.raw[key] is not None:
                raise self.error(clip(str(key)), "is not supported by ambimesh")
            if key not in known and key not in unsupported:
                raise self.error(clip(str(key)), f"unknown field (known: {', '.join(known)})")

    def string(self, key: str, default: str = "", required: bool = False) -> str:
        value = self.raw.get(key)
        if value is None or value == "":
            if required:
                raise self.error(key, "is required")
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {tname(value)}")
        return value

    def integer(self, key: str, default: int, low: int = 0, high: int = 2**32 - 1) -> int:
        return integer(self.obj, self.at(key), self.raw.get(key), default, low, high)

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.raw.get(key)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise self.error(key, f"{quote(value)} is not a number from {low:g} to {high:g}")
        return float(value)

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {quote(value)}")
        return value

    def view(self, key: str) -> View | None:
        """The mapping at ``key``; None when absent."""
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping, got {tname(value)}")
        return View(self.obj, self.at(key), value)

    def views(self, key: str) -> list[View]:
        """The list of mappings at ``key`` (empty when absent)."""
        out = []
        for index, item in enumerate(self.sequence(key)):
            where = f"{self.at(key)}[{index}]"
            if not isinstance(item, Mapping):
                raise self.obj.error(where, f"must be a mapping, got {tname(item)}")
            out.append(View(self.obj, where, item))
        return out

    def sequence(self, key: str) -> list[Any]:
        value = self.raw.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, got {tname(value)}")
        return value

    def strings(self, key: str) -> list[str]:
        values = self.sequence(key)
        for index, value in enumerate(values):
            if not isinstance(value, str) or not value:
                raise self.obj.error(
                    f"{self.at(key)}[{index}]", f"must be a non-empty string, got {quote(value)}"
                )
        return values

    def string_map(self, key: str) -> dict[str, str]:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping, got {tname(value)}")
        return string_map(self.obj, self.at(key), value)

    def port(self, key: str) -> int:
        """A port number; 0 when absent."""
        value = self.raw.get(key)
        return 0 if value is None else port_number(self.obj, self.at(key), value)

    def duration(self, key: str) -> float | None:
        value = self.raw.get(key)
        return None if value is None else duration(self.obj, self.at(key), value)


def duration(obj: ConfigObject, path: str, value: Any) -> float:
    """Seconds of a Go-style duration (``10s``, ``1.5s``, ``100ms``, ``1m``, ``1h``, ``1m30s``)."""
    if not isinstance(value, str) or not _DURATION.fullmatch(value):
        raise obj.error(
            path, f"{quote(value)} is not a duration (e.g. 10s, 1.5s, 100ms, 1m, 1h, 1m30s)"
        )
    return sum(
        float(amount) * _UNIT_SECONDS[unit] for amount, unit in _DURATION_PART.findall(value)
    )


def integer(obj: ConfigObject, path: str, value: Any, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise obj.error(path, f"{quote(value)} is not an integer from {low} to {high}")
    return value


def created(obj: ConfigObject) -> datetime:
    """``metadata.creationTimestamp``; absent counts as oldest, as Go's zero time in Istio."""
    value = obj.get("metadata.creationTimestamp", str, "")
    if not value:
        return OLDEST
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        raise obj.error(
            "metadata.creationTimestamp", f"{quote(value)} is not an RFC 3339 time"
        ) from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def port_number(obj: ConfigObject, path: str, value: Any) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise obj.error(path, f"{quote(value)} is not a port number (1-65535)")
    return value


def string_map(obj: ConfigObject, path: str, value: Mapping[Any, Any]) -> dict[str, str]:
    """Labels and selectors; like Kubernetes, a non-string value (``version: 2``) is an error."""
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise obj.error(
                f"{path}[{clip(str(key))}]", f"values must be strings, got {tname(item)}: quote it"
            )
    return dict(value)


def as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def expected_name(expected: type | tuple[type, ...]) -> str:
    names = {Mapping: "a mapping", list: "a list", str: "a string", int: "an integer"}
    return " or ".join(names.get(t, t.__name__) for t in as_tuple(expected))


def tname(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "an integer",
        bool: "a boolean",
        float: "a number",
    }.get(type(value), type(value).__name__)
