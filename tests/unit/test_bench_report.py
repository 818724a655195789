"""bench/report.py: medians over rounds, added latency, peaks, ratios, the printed table."""

from __future__ import annotations

import pytest

from bench.report import Run, format_footer, format_table, noise_summary, summarize


def line(runs: list[Run], label_start: str) -> dict[str, float | None]:
    return next(x.values for x in summarize(runs) if x.label.startswith(label_start))


def test_median_over_rounds_per_variant() -> None:
    runs = [
        Run(r, "bulk", "ambimesh", {"gbps": g}) for r, g in enumerate((0.5, 0.9, 0.7), start=1)
    ] + [Run(1, "bulk", "envoy", {"gbps": 5.0})]
    values = line(runs, "bulk")
    assert values == {"direct": None, "ambimesh": 0.7, "envoy": 5.0}


def test_latency_rows_subtract_direct_for_the_proxies() -> None:
    runs = [
        Run(1, "latency", "direct", {"p50_us": 100}),
        Run(1, "latency", "ambimesh", {"p50_us": 900}),
        Run(1, "latency", "envoy", {"p50_us": 500}),
    ]
    assert line(runs, "latency p50") == {"direct": 100, "ambimesh": 800, "envoy": 400}
    p50 = next(x for x in summarize(runs) if x.label.startswith("latency p50"))
    assert p50.ratio == 2.0


def test_peak_memory_is_the_largest_of_every_test() -> None:
    runs = [
        Run(1, "bulk", "envoy", {"client_peak_mib": 90.0}),
        Run(1, "rps", "envoy", {"client_peak_mib": 70.0}),
        Run(0, "idle", "envoy", {"client_rss_mib": 60.0}),
    ]
    assert line(runs, "RSS peak MiB, client")["envoy"] == 90.0
    assert line(runs, "RSS idle MiB, client")["envoy"] == 60.0


def test_ratio_needs_both_sides() -> None:
    runs = [Run(1, "rps", "ambimesh", {"rps": 10.0})]
    rps = next(x for x in summarize(runs) if x.label.startswith("max req/s, keep"))
    assert rps.ratio is None


def test_table_has_a_row_per_metric_and_dashes_for_missing() -> None:
    runs = [
        Run(1, "rps", "direct", {"rps": 50000.0}),
        Run(1, "rps", "ambimesh", {"rps": 2000.0, "client_cpu_us_per_request": 210.04}),
        Run(1, "rps", "envoy", {"rps": 8000.0, "client_cpu_us_per_request": 42.0}),
    ]
    table = format_table(summarize(runs)).splitlines()
    assert table[0].split() == ["metric", "direct", "ambimesh", "envoy", "ambimesh/envoy"]
    keep_alive = next(r for r in table if r.startswith("max req/s, keep-alive"))
    assert keep_alive.split()[-4:] == ["50,000", "2,000", "8,000", "0.25x"]
    cpu = next(r for r in table if r.startswith("CPU us per request, client"))
    assert cpu.split()[-4:] == ["-", "210.0", "42.0", "5.00x"]


def test_noise_and_footer() -> None:
    runs = [
        Run(
            1,
            "latency",
            "ambimesh",
            {"rps": 998.0, "errors": 2},
            {"foreign_pct": 10.0, "steal_pct": 1.0},
        ),
        Run(
            2,
            "latency",
            "ambimesh",
            {"rps": 1003.0, "errors": 1},
            {"foreign_pct": 30.0, "steal_pct": 4.0},
        ),
        Run(0, "idle", "ambimesh", {"client_rss_mib": 70.0}),
    ]
    noise = noise_summary(runs)["ambimesh"]
    assert noise == {"foreign_pct_median": 20.0, "foreign_pct_max": 30.0, "steal_pct_max": 4.0}
    footer = format_footer(runs)
    assert "ambimesh: achieved rate in latency runs 998, 1003 req/s; errors 3" in footer
    assert "max 30% of a CPU" in footer


@pytest.mark.parametrize("variant", ["direct", "envoy"])
def test_variants_without_runs_are_left_out_of_the_noise(variant: str) -> None:
    assert variant not in noise_summary(
        [Run(1, "bulk", "ambimesh", {}, {"foreign_pct": 1.0, "steal_pct": 0.0})]
    )
