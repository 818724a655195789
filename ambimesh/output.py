"""The one `--output table|json|yaml` of the CLI's read-only commands.

Each command builds plain data (dicts, lists, strings, numbers, booleans, None) once;
json and yaml print that same data, so scripts get exactly what the table was made from,
and the table is the command's own view of it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from datetime import datetime

import yaml

FORMATS = ("table", "json", "yaml")


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output",
        "-o",
        choices=FORMATS,
        default="table",
        help="table (for people), or json / yaml (the same data, for scripts)",
    )


def render(data: object, fmt: str, table: Callable[[], str]) -> str:
    """``data`` as ``fmt``; ``table`` makes the table view only when it is asked for."""
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip("\n")
    if fmt == "table":
        return table()
    raise ValueError(f"unknown output format {fmt!r}: one of {', '.join(FORMATS)}")


def columns(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns two spaces apart (kubectl's look); None and "" print as "-"."""
    cells = [list(headers), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells
    )


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    return str(value)


def duration(seconds: float) -> str:
    """A short human duration, kubectl's style: 45s, 3m12s, 5h2m, 2d3h; negative: '-' sign."""
    sign, left = ("-" if seconds < 0 else ""), int(abs(seconds))
    days, left = divmod(left, 86400)
    hours, left = divmod(left, 3600)
    minutes, secs = divmod(left, 60)
    if days:
        return f"{sign}{days}d{hours}h"
    if hours:
        return f"{sign}{hours}h{minutes}m"
    if minutes:
        return f"{sign}{minutes}m{secs}s"
    return f"{sign}{secs}s"


def seconds_until(iso_time: object, now: float) -> float | None:
    """Seconds from ``now`` to an ISO 8601 time (negative if past); None if not one."""
    try:
        return datetime.fromisoformat(str(iso_time)).timestamp() - now
    except ValueError:
        return None


def time_left(iso_time: object, now: float) -> str:
    """``duration`` to an ISO 8601 time, "?" if it is not one."""
    left = seconds_until(iso_time, now)
    return "?" if left is None else duration(left)
