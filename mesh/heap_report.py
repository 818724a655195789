"""What a proxy process's memory is made of, for an admin endpoint (``/debug/memory``).

Cheap unless asked: the kernel's view (smaps_rollup) and a count of the garbage
collector's live objects by type are always there; Python allocations by source line
only while tracemalloc traces, i.e. in a process started with ``PYTHONTRACEMALLOC=1``
(or ``python -X tracemalloc``), since tracing costs memory and CPU on every allocation.
"""

from __future__ import annotations

import collections
import gc
import tracemalloc
from pathlib import Path

ROLLUP_FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File")


def rollup_kib(text: str) -> dict[str, int]:
    """The :data:`ROLLUP_FIELDS` of a /proc/<pid>/smaps_rollup text, in KiB."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in ROLLUP_FIELDS:
            out[name] = int(value.split()[0])
    return out


def objects_by_type(objects: list[object], limit: int) -> list[tuple[str, int]]:
    counts = collections.Counter(type(o).__qualname__ for o in objects)
    return counts.most_common(limit)


def heap_report(limit: int = 30) -> dict[str, object]:
    objects = gc.get_objects()
    report: dict[str, object] = {
        "kib": rollup_kib(Path("/proc/self/smaps_rollup").read_text()),
        "gc_objects": len(objects),
        "gc_objects_by_type": objects_by_type(objects, limit),
    }
    del objects
    if not tracemalloc.is_tracing():
        report["tracemalloc"] = "off: start the process with PYTHONTRACEMALLOC=1 to see lines"
        return report
    snapshot = tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__),)
    )
    stats = snapshot.statistics("lineno")
    report["tracemalloc"] = {
        "traced_kib": sum(s.size for s in stats) // 1024,
        "top_lines": [
            {"where": str(s.traceback[0]), "kib": round(s.size / 1024, 1), "blocks": s.count}
            for s in stats[:limit]
        ],
    }
    return report
