"""The controller-at-scale bench's arithmetic: per-node ACK latencies of a change, their
distribution, and the table. Pure (tests/unit/test_bench_controller.py)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Ack:
    """A node's answer to one version (times from ``time.monotonic()``)."""

    node: str
    version: str
    full: bool
    resources: int
    removed: int
    received: float
    acked: float


@dataclass(frozen=True)
class Stats:
    count: int
    p50: float
    p90: float
    p99: float
    max: float


def percentile(values: list[float], pct: float) -> float:
    """Nearest rank: the smallest value with at least ``pct`` percent at or below it."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def stats(values: Iterable[float]) -> Stats:
    data = list(values)
    return Stats(
        len(data),
        percentile(data, 50),
        percentile(data, 90),
        percentile(data, 99),
        max(data),
    )


def first_after(acks: Iterable[Ack], since: float) -> dict[str, Ack]:
    """Each node's first answer to a version it received after ``since``."""
    out: dict[str, Ack] = {}
    for ack in sorted(acks, key=lambda a: a.received):
        if ack.received > since:
            out.setdefault(ack.node, ack)
    return out


def latencies(answers: Mapping[str, Ack], since: float, nodes: Iterable[str]) -> dict[str, float]:
    """From ``since`` to each of ``nodes``' ACK; nodes without an answer are left out."""
    return {n: answers[n].acked - since for n in nodes if n in answers}


@dataclass(frozen=True)
class Round:
    """One relabel: when it was written and each node's ACK latency, seconds."""

    namespace: str
    mode: str
    latency: dict[str, float]
    expected: int  # nodes that should have answered
    changed: int  # resources in the delta the nodes received (most common value)
    rss_mib: float  # the controller's, after the round

    @property
    def complete(self) -> bool:
        return len(self.latency) == self.expected

    @property
    def all_acked_s(self) -> float | None:
        """Until the last expected node ACKed; None if some never did."""
        return max(self.latency.values()) if self.complete else None


def pooled(rounds: Iterable[Round], nodes: set[str] | None = None) -> Stats | None:
    """Every per-node latency of ``rounds`` (of ``nodes`` only, if given)."""
    values = [s for r in rounds for n, s in r.latency.items() if nodes is None or n in nodes]
    return stats(values) if values else None


def slowest(rounds: Iterable[Round], nodes: set[str]) -> list[float]:
    """Per round, the last ACK among ``nodes``; rounds where one of them never ACKed are
    left out."""
    out = []
    for r in rounds:
        mine = [r.latency[n] for n in nodes if n in r.latency]
        if mine and len(mine) == len(nodes):
            out.append(max(mine))
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass(frozen=True)
class Summary:
    nodes: int
    pods: int
    namespaces: int
    services: int
    startup_s: float | None
    startup_cpu_s: float
    startup_rss_mib: float
    healthy: list[Round]
    impaired: list[Round]
    others: set[str]  # the nodes neither stuck nor slow
    stuck: int
    slow: dict[str, float]  # node -> its ACK delay
    cpu_per_round_s: float
    peak_rss_mib: float
    clients_cpu_s: float


def table(s: Summary) -> str:
    """What ``make bench-controller`` prints; targets beside the numbers they judge."""
    healthy_all = [r.all_acked_s for r in s.healthy if r.all_acked_s is not None]
    others_healthy = slowest(s.healthy, s.others)
    others_impaired = slowest(s.impaired, s.others)
    slow_nodes = set(s.slow)
    slow_values = [v for r in s.impaired for n, v in r.latency.items() if n in slow_nodes]
    pooled_h = pooled(s.healthy)
    pooled_i = pooled(s.impaired, s.others)
    rss_impaired = [r.rss_mib for r in s.impaired]
    width = 64
    rows: list[tuple[str, str, str]] = [
        ("first full snapshot, all nodes ACKed (s)", _fmt(s.startup_s), ""),
        ("  controller CPU for it (s)", _fmt(s.startup_cpu_s, 1), ""),
        (
            f"relabel -> all {s.nodes} nodes ACKed (s), median of {len(s.healthy)}",
            _fmt(_median(healthy_all)),
            "< 1",
        ),
        ("  worst round (s)", _fmt(max(healthy_all, default=None)), "< 1"),
        (
            "  per node p50 / p99 (s)",
            f"{_fmt(pooled_h.p50 if pooled_h else None)} / "
            f"{_fmt(pooled_h.p99 if pooled_h else None)}",
            "",
        ),
        (
            f"  rounds where every node ACKed (of {len(s.healthy)})",
            str(sum(r.complete for r in s.healthy)),
            "",
        ),
        ("controller CPU per relabel (s)", _fmt(s.cpu_per_round_s), ""),
        (
            f"with {s.stuck} stuck + {len(s.slow)} slow nodes: the "
            f"{len(s.others)} others ACKed (s), median of {len(s.impaired)}",
            _fmt(_median(others_impaired)),
            f"~{_fmt(_median(others_healthy))}",
        ),
        (
            "  per node p50 / p99 (s)",
            f"{_fmt(pooled_i.p50 if pooled_i else None)} / "
            f"{_fmt(pooled_i.p99 if pooled_i else None)}",
            "",
        ),
        (
            f"  slow node (ACKs after {_fmt(max(s.slow.values(), default=0.0), 1)} s), median (s)",
            _fmt(_median(slow_values)),
            "",
        ),
        ("controller RSS after startup (MiB)", _fmt(s.startup_rss_mib, 0), "< 500"),
        (
            "  with stuck nodes, after the first / last round (MiB)",
            f"{_fmt(rss_impaired[0] if rss_impaired else None, 0)} / "
            f"{_fmt(rss_impaired[-1] if rss_impaired else None, 0)}",
            "flat",
        ),
        ("  peak, VmHWM (MiB)", _fmt(s.peak_rss_mib, 0), "< 500"),
        ("simulated nodes' CPU, all client processes (s)", _fmt(s.clients_cpu_s, 1), ""),
    ]
    title = (
        f"Controller at scale: {s.nodes} nodes, {s.pods} pods "
        f"({s.namespaces} namespaces, {s.services} services)"
    )
    lines = [f"{title:<{width}}{'value':>14}{'target':>9}"]
    lines += [f"{label:<{width}}{value:>14}{target:>9}" for label, value, target in rows]
    return "\n".join(lines)
