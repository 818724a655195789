"""From the runs to the table: medians over rounds, added latency, ambimesh/Envoy ratios.

Pure (no I/O), so the arithmetic is unit-tested (tests/unit/test_bench_report.py).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

VARIANTS = ("direct", "ambimesh", "envoy")


@dataclass(frozen=True)
class Run:
    """One measurement: a test of one variant in one round (round 0, test "idle": the
    proxies' memory once started, before any traffic)."""

    round: int
    test: str
    variant: str
    values: dict[str, float]
    noise: dict[str, float] = field(default_factory=dict)  # foreign_pct, steal_pct


@dataclass(frozen=True)
class Row:
    label: str
    test: str | None  # None: every test of the variant
    key: str
    digits: int = 0
    added: bool = False  # minus the baseline's, the first variant (which shows its own)
    peak: bool = False  # the largest value instead of the median


ROWS = (
    Row("bulk, 1 TCP stream (iperf3), Gbit/s", "bulk", "gbps", 2),
    Row("max req/s, keep-alive (wrk -c16 -t2, 1 KiB)", "rps", "rps"),
    Row("max req/s, Connection: close", "close", "rps"),
    Row("latency p50 @1000 req/s, us added (direct: own)", "latency", "p50_us", added=True),
    Row("latency p90 @1000 req/s, us added (direct: own)", "latency", "p90_us", added=True),
    Row("latency p99 @1000 req/s, us added (direct: own)", "latency", "p99_us", added=True),
    Row("CPU us per request, client proxy", "rps", "client_cpu_us_per_request", 1),
    Row("CPU us per request, server proxy", "rps", "server_cpu_us_per_request", 1),
    Row("CPU us per new connection, client proxy", "close", "client_cpu_us_per_request", 1),
    Row("CPU us per new connection, server proxy", "close", "server_cpu_us_per_request", 1),
    Row("CPU s per GB, receiving (server) proxy", "bulk", "server_cpu_s_per_gb", 2),
    Row("CPU s per GB, sending (client) proxy", "bulk", "client_cpu_s_per_gb", 2),
    Row("RSS idle MiB, client proxy", "idle", "client_rss_mib", 1),
    Row("RSS idle MiB, server proxy", "idle", "server_rss_mib", 1),
    Row("RSS peak MiB, client proxy", None, "client_peak_mib", 1, peak=True),
    Row("RSS peak MiB, server proxy", None, "server_peak_mib", 1, peak=True),
)


@dataclass(frozen=True)
class Line:
    label: str
    values: dict[str, float | None]  # by variant
    digits: int

    @property
    def ratio(self) -> float | None:
        """ambimesh / Envoy: above 1 is more (faster, or more CPU/memory/latency)."""
        ours, theirs = self.values.get("ambimesh"), self.values.get("envoy")
        if ours is None or theirs is None or theirs == 0:
            return None
        return ours / theirs


def _collect(runs: list[Run], variant: str, row: Row) -> list[float]:
    return [
        run.values[row.key]
        for run in runs
        if run.variant == variant
        and (row.test is None or run.test == row.test)
        and row.key in run.values
    ]


def _value(runs: list[Run], variant: str, row: Row) -> float | None:
    values = _collect(runs, variant, row)
    if not values:
        return None
    return max(values) if row.peak else statistics.median(values)


def summarize(
    runs: list[Run], rows: tuple[Row, ...] = ROWS, variants: tuple[str, ...] = VARIANTS
) -> list[Line]:
    """One line per row; an ``added`` row subtracts the first variant's (the baseline's)
    value from the others'."""
    lines = []
    for row in rows:
        values = {v: _value(runs, v, row) for v in variants}
        base = values[variants[0]]
        if row.added and base is not None:
            for variant in variants[1:]:
                own = values[variant]
                values[variant] = None if own is None else own - base
        lines.append(Line(row.label, values, row.digits))
    return lines


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(lines: list[Line], variants: tuple[str, ...] = VARIANTS) -> str:
    header = ["metric", *variants, "ambimesh/envoy"]
    rows = [
        [
            line.label,
            *(_cell(line.values[v], line.digits) for v in variants),
            "-" if line.ratio is None else f"{line.ratio:.2f}x",
        ]
        for line in lines
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for i, r in enumerate([header, *rows]):
        out.append(
            "  ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def noise_summary(
    runs: list[Run], variants: tuple[str, ...] = VARIANTS
) -> dict[str, dict[str, float]]:
    """Per variant: the median and worst CPU used outside the lab, and steal, in % of a CPU."""
    out = {}
    for variant in variants:
        measured = [r.noise for r in runs if r.variant == variant and r.noise]
        if not measured:
            continue
        foreign = [n["foreign_pct"] for n in measured]
        steal = [n["steal_pct"] for n in measured]
        out[variant] = {
            "foreign_pct_median": statistics.median(foreign),
            "foreign_pct_max": max(foreign),
            "steal_pct_max": max(steal),
        }
    return out


def format_footer(runs: list[Run], variants: tuple[str, ...] = VARIANTS) -> str:
    lines = []
    for variant in variants:
        latency = [r.values for r in runs if r.variant == variant and r.test == "latency"]
        rates = ", ".join(f"{v['rps']:.0f}" for v in latency)
        errors = sum(int(r.values.get("errors", 0)) for r in runs if r.variant == variant)
        lines.append(f"{variant}: achieved rate in latency runs {rates} req/s; errors {errors}")
    for variant, noise in noise_summary(runs, variants).items():
        median, worst = noise["foreign_pct_median"], noise["foreign_pct_max"]
        lines.append(
            f"{variant}: CPU outside the lab during runs median {median:.0f}%, max {worst:.0f}%"
            f" of a CPU; max steal {noise['steal_pct_max']:.0f}%"
        )
    return "\n".join(lines)
