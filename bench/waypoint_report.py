"""The waypoint benchmark's table and the issue's two targets, from its runs.

Pure, like bench/report.py whose medians, baseline subtraction and layout it reuses
(tests/unit/test_bench_waypoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.report import Line, Row

ROWS = (
    Row("max req/s (wrk -c16 -t2, keep-alive, 1 KiB)", "rps", "rps"),
    Row("latency p50 @1000 req/s (16 conns), us", "latency", "p50_us"),
    Row("latency p90 @1000 req/s (16 conns), us", "latency", "p90_us"),
    Row("latency p99 @1000 req/s (16 conns), us", "latency", "p99_us"),
    Row("  p50 added by the waypoint, us (l4: own)", "latency", "p50_us", added=True),
    Row("  p99 added by the waypoint, us (l4: own)", "latency", "p99_us", added=True),
    Row("waypoint CPU us per request, at max req/s", "rps", "waypoint_cpu_us_per_request", 1),
    Row("waypoint CPU us per request, at 1000 req/s", "latency", "waypoint_cpu_us_per_request", 1),
    Row("waypoint RSS idle MiB", "idle", "waypoint_rss_mib", 1),
    Row("waypoint RSS peak MiB", None, "waypoint_peak_mib", 1, peak=True),
)


@dataclass(frozen=True)
class Target:
    """ambimesh/Envoy on the line labelled ``label`` must be at most (or at least) ``bound``."""

    name: str
    label: str
    bound: float
    at_most: bool

    def verdict(self, lines: list[Line]) -> str:
        ratio = next((line.ratio for line in lines if line.label == self.label), None)
        wanted = f"{'<=' if self.at_most else '>='} {self.bound:g}x"
        if ratio is None:
            return f"{self.name}: not measured (target {wanted})"
        met = ratio <= self.bound if self.at_most else ratio >= self.bound
        return f"{self.name}: {ratio:.2f}x Envoy's (target {wanted}): {'met' if met else 'MISSED'}"


TARGETS = (
    Target("p99 at 1000 req/s", ROWS[3].label, 1.5, at_most=True),
    Target("max req/s", ROWS[0].label, 0.5, at_most=False),
)


def format_targets(lines: list[Line]) -> str:
    return "\n".join(target.verdict(lines) for target in TARGETS)
