"""``python -m bench.waypoint_bench [--quick]``: ambimesh's waypoint vs Envoy as the waypoint.

Builds the ``amwpbench`` lab (bench/waypoint_lab.py: the same client -> ztunnel -> waypoint
-> ztunnel -> nginx path with either waypoint, and the path without one as the baseline),
records the waypoints' idle memory, warms every path up, then runs rounds; within a round
each test runs on every variant in turn. Tests: max req/s (wrk unpaced) and latency at a
fixed 1000 req/s, both over 16 keep-alive connections with 1 KiB answers; beside each,
the waypoint process's CPU (utime + stime, every thread) and peak RSS. Medians over rounds
go into the table, with ambimesh/Envoy ratios and the issue's targets. The lab and every
process the benchmark started are removed at the end, also after an error, Ctrl-C or
SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import sys
import tempfile
from pathlib import Path

from ambimesh.lab.lab import Lab
from bench import loadgen
from bench.parsers import LoopProfile
from bench.profile import profile_during
from bench.report import Run, format_footer, format_table, noise_summary, summarize
from bench.runner import (
    RESULTS,
    Settings,
    format_profile,
    idle_memory,
    load,
    machine_facts,
    measure,
    stop_on_signals,
)
from bench.testbed import Variant
from bench.waypoint_lab import LAB_NAME, VARIANTS, WaypointTestbed
from bench.waypoint_report import ROWS, format_targets

TESTS = ("rps", "latency")
PROFILE_SECONDS = 8
WARM_UP_SECONDS = 2
# bulk and close are bench.runner's tests; this benchmark runs neither
QUICK = Settings(rounds=2, bulk_s=0, rps_s=4, close_s=0, latency_s=5)
FULL = Settings(rounds=3, bulk_s=0, rps_s=10, close_s=0, latency_s=15)


def warm_up(bed: WaypointTestbed, variants: tuple[Variant, ...], s: Settings) -> None:
    """Certificates, pooled HBONE and upstream connections exist before anything is timed."""
    for variant in variants:
        argv = loadgen.wrk_argv(variant.url, WARM_UP_SECONDS, s.connections, s.threads)
        loadgen.wrk(bed.lab, variant.client_pod, argv, WARM_UP_SECONDS)


def progress(run: Run) -> str:
    v = run.values
    line = f"[bench] round {run.round} {run.test:<7} {run.variant:<8} {v['rps']:,.0f} req/s"
    if run.test == "latency":
        line += f", p50/p90/p99 {v['p50_us']:.0f}/{v['p90_us']:.0f}/{v['p99_us']:.0f} us"
    if "waypoint_cpu_us_per_request" in v:
        line += f"; waypoint {v['waypoint_cpu_us_per_request']:.0f} CPU-us/request"
    if v["errors"]:
        line += f"; {v['errors']:.0f} errors"
    return line + f" (outside the lab: {run.noise['foreign_pct']:.0f}% of a CPU)"


def profile_waypoint(
    bed: WaypointTestbed, variants: tuple[Variant, ...], s: Settings, out_dir: Path
) -> dict[str, LoopProfile]:
    """py-spy on ambimesh's waypoint at max req/s and at 1000 req/s."""
    mesh = next(v for v in variants if v.name == "ambimesh")
    longer = dataclasses.replace(s, rps_s=PROFILE_SECONDS, latency_s=PROFILE_SECONDS)
    profiles = {}
    for test in TESTS:
        print(f"[bench] profiling the ambimesh waypoint during {test}", flush=True)
        profiles[test] = profile_during(
            mesh.proxies,
            PROFILE_SECONDS,
            out_dir,
            f"waypoint-{test}",
            functools.partial(load, bed.lab, mesh, test, longer),
        )["waypoint"]
    return profiles


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.waypoint_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="2 short rounds, about 2 minutes")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, py-spy the ambimesh waypoint during both tests",
    )
    p.add_argument("--lab", default=LAB_NAME, help=f"lab name (default {LAB_NAME})")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.rounds:
        s = dataclasses.replace(s, rounds=args.rounds)
    stop_on_signals()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bed = WaypointTestbed(Lab(args.lab))
    runs: list[Run] = []
    profiles: dict[str, LoopProfile] = {}
    try:
        facts = machine_facts()
        with tempfile.TemporaryDirectory(prefix="amwpbench-") as config_dir:
            variants = bed.up(Path(config_dir))
        runs += idle_memory(variants)
        warm_up(bed, variants, s)
        bed.check_routing()
        for round_no in range(1, s.rounds + 1):
            for test in TESTS:
                for variant in variants:
                    runs.append(measure(bed, variant, test, s, round_no))
                    print(progress(runs[-1]), flush=True)
        if args.profile:
            profiles = profile_waypoint(bed, variants, s, args.out / f"waypoint-{stamp}")
    finally:
        bed.down()
    lines = summarize(runs, ROWS, VARIANTS)
    result = {
        "benchmark": "waypoint",
        "started": stamp,
        "mode": "quick" if args.quick else "full",
        "settings": dataclasses.asdict(s),
        "machine": facts,
        "table": [dataclasses.asdict(line) | {"ratio": line.ratio} for line in lines],
        "targets": format_targets(lines).splitlines(),
        "noise": noise_summary(runs, VARIANTS),
        "runs": [dataclasses.asdict(r) for r in runs],
        "profiles": {test: dataclasses.asdict(p) for test, p in profiles.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"waypoint-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print()
    print(
        f"ambimesh waypoint vs Envoy {facts['envoy']} as the waypoint (1 worker each, the same"
        f" ztunnels around both), medians of {s.rounds} rounds"
    )
    print(format_table(lines, VARIANTS))
    print(format_targets(lines))
    print(format_footer(runs, VARIANTS))
    for test, p in profiles.items():
        print(format_profile(f"ambimesh waypoint, {test}", p))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
