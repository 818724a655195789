"""mesh.heap_report: what /debug/memory shows, with and without tracemalloc."""

from __future__ import annotations

import json
import tracemalloc

from mesh.heap_report import heap_report, objects_by_type, rollup_kib

ROLLUP = """55e90f9cf000-7fff297b2000 ---p 00000000 00:00 0                          [rollup]
Rss:                1700 kB
Pss:                 194 kB
Pss_Dirty:           116 kB
Pss_Anon:            116 kB
Pss_File:             78 kB
Anonymous:           116 kB
"""


def test_rollup_fields() -> None:
    assert rollup_kib(ROLLUP) == {"Rss": 1700, "Pss": 194, "Pss_Anon": 116, "Pss_File": 78}


def test_objects_counted_by_type() -> None:
    class Thing:
        pass

    things: list[object] = [Thing(), Thing(), [], {}]
    assert objects_by_type(things, 1) == [(Thing.__qualname__, 2)]


def test_report_without_tracing_says_how_to_turn_it_on() -> None:
    assert not tracemalloc.is_tracing()
    report = heap_report(limit=5)
    kib, by_type = report["kib"], report["gc_objects_by_type"]
    assert isinstance(kib, dict) and isinstance(by_type, list)
    assert set(kib) == {"Rss", "Pss", "Pss_Anon", "Pss_File"}
    assert len(by_type) == 5
    assert "PYTHONTRACEMALLOC" in str(report["tracemalloc"])
    json.dumps(report)  # what the admin endpoint serves


def test_report_while_tracing_names_the_allocating_lines() -> None:
    tracemalloc.start()
    try:
        kept = [bytearray(1024) for _ in range(100)]
        report = heap_report(limit=50)
    finally:
        tracemalloc.stop()
    traced = report["tracemalloc"]
    assert isinstance(traced, dict)
    assert any(__file__ in line["where"] for line in traced["top_lines"])
    assert all("tracemalloc.py" not in line["where"] for line in traced["top_lines"])
    assert len(kept) == 100


def test_ztunnel_admin_serves_it() -> None:
    from ztunnel.admin import admin_routes_of

    status, kind, body = admin_routes_of(dict, list)["/debug/memory"]()
    assert (status, kind) == (200, "application/json")
    assert json.loads(body)["gc_objects"] > 0
