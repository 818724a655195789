"""``python -m bench [--quick]``: direct vs ambimesh vs an Envoy HBONE pair, back to back.

Builds the ``ambench`` lab (bench/testbed.py), records the proxies' idle memory (started,
no traffic yet), warms every path up, then runs rounds; within a round each test runs on
every variant in turn, so the three are compared seconds, not hours, apart and drift on a
shared machine hits all of them. Medians over rounds go into the table. The lab, and with
it every process the benchmark started, is removed at the end, also after an error,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ambimesh.lab.lab import Lab
from bench import envoy, loadgen
from bench.parsers import LoopProfile
from bench.profile import profile_during
from bench.report import Run, format_footer, format_table, noise_summary, summarize
from bench.sampling import RunMeter
from bench.testbed import LAB_NAME, Testbed, Variant

RESULTS = Path(__file__).parent / "results"
TESTS = ("bulk", "rps", "close", "latency")
PROFILED_TESTS = ("bulk", "rps", "close")
PROFILE_SECONDS = 8


@dataclass(frozen=True)
class Settings:
    rounds: int
    bulk_s: int
    rps_s: int
    close_s: int
    latency_s: int
    rate: int = 1000  # requests/s for the latency test
    connections: int = 16
    threads: int = 2

    def seconds(self, test: str) -> int:
        return {
            "bulk": self.bulk_s,
            "rps": self.rps_s,
            "close": self.close_s,
            "latency": self.latency_s,
        }[test]


QUICK = Settings(rounds=2, bulk_s=3, rps_s=3, close_s=3, latency_s=4)
FULL = Settings(rounds=3, bulk_s=10, rps_s=10, close_s=5, latency_s=15)


def load(lab: Lab, variant: Variant, test: str, s: Settings) -> dict[str, float]:
    """Run one test's load generator through ``variant``; what it measured."""
    seconds = s.seconds(test)
    if test == "bulk":
        r = loadgen.iperf3(lab, variant.client_pod, *variant.bulk, seconds)
        return {"gbps": r.bits_per_second / 1e9, "gb": r.bytes / 1e9}
    argv = loadgen.wrk_argv(
        variant.url,
        seconds,
        s.connections,
        s.threads,
        close=test == "close",
        rate=s.rate if test == "latency" else None,
    )
    w = loadgen.wrk(lab, variant.client_pod, argv, seconds)
    return {
        "rps": w.rps,
        "requests": w.requests,
        "errors": w.errors,
        "p50_us": w.p50_us,
        "p90_us": w.p90_us,
        "p99_us": w.p99_us,
    }


def measure(bed: Testbed, variant: Variant, test: str, s: Settings, round_no: int) -> Run:
    meter = RunMeter(variant.proxies, bed.lab_cgroup())
    meter.start()
    values = load(bed.lab, variant, test, s)
    usage, noise = meter.stop()
    for side, u in usage.items():
        values[f"{side}_cpu_s"] = u.cpu_seconds
        values[f"{side}_cpu_system_s"] = u.system_seconds
        values[f"{side}_peak_mib"] = u.peak_mib
        if test == "bulk":
            values[f"{side}_cpu_s_per_gb"] = u.cpu_seconds / values["gb"]
        elif values["requests"]:
            values[f"{side}_cpu_us_per_request"] = u.cpu_seconds / values["requests"] * 1e6
    return Run(round_no, test, variant.name, values, dataclasses.asdict(noise))


def progress(run: Run) -> str:
    v = run.values
    main = f"{v['gbps']:.2f} Gbit/s" if run.test == "bulk" else f"{v['rps']:,.0f} req/s"
    if run.test == "latency":
        main += f", p50/p90/p99 {v['p50_us']:.0f}/{v['p90_us']:.0f}/{v['p99_us']:.0f} us"
    cpu = ", ".join(
        f"{side} {v[f'{side}_cpu_s']:.2f}" for side in ("client", "server") if f"{side}_cpu_s" in v
    )
    cpu = f"; proxy CPU-s {cpu}" if cpu else ""
    return (
        f"[bench] round {run.round} {run.test:<7} {run.variant:<8} {main}{cpu}"
        f" (outside the lab: {run.noise['foreign_pct']:.0f}% of a CPU)"
    )


def warm_up(
    bed: Testbed, variants: tuple[Variant, ...], s: Settings, tests: tuple[str, ...] = TESTS
) -> None:
    """Certificates, pooled HBONE connections and caches exist before anything is timed
    (the load generators of the tests that will run only)."""
    for variant in variants:
        if set(tests) - {"bulk"}:
            argv = loadgen.wrk_argv(variant.url, 1, s.connections, s.threads)
            loadgen.wrk(bed.lab, variant.client_pod, argv, 1)
        if "bulk" in tests:
            loadgen.iperf3(bed.lab, variant.client_pod, *variant.bulk, 1)


def idle_memory(variants: tuple[Variant, ...]) -> list[Run]:
    return [
        Run(0, "idle", v.name, {f"{p.side}_rss_mib": p.rss_mib() for p in v.proxies})
        for v in variants
        if v.proxies
    ]


def machine_facts() -> dict[str, str]:
    model = next(
        (
            line.partition(":")[2].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    envoy_version = subprocess.run(
        [str(envoy.envoy_binary()), "--version"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        timeout=30,
    ).stdout.strip()
    return {
        "cpu": model,
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "envoy": envoy_version.rpartition("version: ")[2].split("/")[1],
        "commit": commit,
    }


def profile_ztunnels(
    bed: Testbed,
    variants: tuple[Variant, ...],
    s: Settings,
    out_dir: Path,
    tests: tuple[str, ...] = PROFILED_TESTS,
) -> dict[str, dict[str, LoopProfile]]:
    """py-spy on both ztunnels during ambimesh runs of the tests where it is furthest
    behind; long enough for a few hundred samples even when py-spy falls behind."""
    mesh = next(v for v in variants if v.name == "ambimesh")
    longer = dataclasses.replace(
        s, bulk_s=PROFILE_SECONDS, rps_s=PROFILE_SECONDS, close_s=PROFILE_SECONDS
    )
    profiles = {}
    for test in tests:
        print(f"[bench] profiling both ztunnels during {test}", flush=True)
        profiles[test] = profile_during(
            mesh.proxies,
            PROFILE_SECONDS,
            out_dir,
            test,
            functools.partial(load, bed.lab, mesh, test, longer),
        )
    return profiles


def format_profile(title: str, p: LoopProfile) -> str:
    lines = [
        f"\n{title}: event loop busy {100 * p.busy_share:.0f}% of {p.samples} samples; of that:"
    ]
    for heading, frames in (("self time", p.frames), ("innermost Python function", p.python)):
        lines.append(f"  by {heading}:")
        lines += [f"  {100 * f.self_share:5.1f}%  {f.name}" for f in frames[:10]]
    return "\n".join(lines)


def stop_on_signals() -> None:
    """SIGTERM/SIGHUP unwind through the ``finally`` that removes the lab, like Ctrl-C.

    Only in this process: pyroute2 forks children (netns creation) that inherit the
    handler and are ended with SIGTERM; one of them must not tear the lab down.
    """
    main_pid = os.getpid()

    def stop(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def only_tests(text: str) -> tuple[str, ...]:
    """``--only``'s value: comma-separated test names, returned in the usual run order."""
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(TESTS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown test {', '.join(unknown) or repr(text)}: choose from {', '.join(TESTS)}"
        )
    return tuple(t for t in TESTS if t in names)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 short rounds, under 3 minutes")
    p.add_argument("--rounds", type=int, help="override the number of rounds")
    p.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, py-spy both ztunnels during ambimesh bulk, keep-alive and close runs",
    )
    p.add_argument(
        "--only",
        type=only_tests,
        default=TESTS,
        metavar="TEST[,TEST]",
        help=f"run only these tests (of {', '.join(TESTS)}), e.g. for an A/B of one figure",
    )
    p.add_argument("--lab", default=LAB_NAME, help=f"lab name (default {LAB_NAME})")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="ztunnel --workers and Envoy --concurrency on both sides (default 1)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = QUICK if args.quick else FULL
    if args.rounds:
        s = dataclasses.replace(s, rounds=args.rounds)
    stop_on_signals()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bed = Testbed(Lab(args.lab, ztunnel_workers=args.workers))
    runs: list[Run] = []
    profiles: dict[str, dict[str, LoopProfile]] = {}
    try:
        facts = machine_facts()
        with tempfile.TemporaryDirectory(prefix="ambench-") as config_dir:
            variants = bed.up(Path(config_dir))
        runs += idle_memory(variants)
        warm_up(bed, variants, s, args.only)
        for round_no in range(1, s.rounds + 1):
            for test in args.only:
                for variant in variants:
                    runs.append(measure(bed, variant, test, s, round_no))
                    print(progress(runs[-1]), flush=True)
        if args.profile:
            profiled = tuple(t for t in PROFILED_TESTS if t in args.only)
            profiles = profile_ztunnels(bed, variants, s, args.out / stamp, profiled)
    finally:
        bed.down()
    lines = summarize(runs)
    result = {
        "started": stamp,
        "mode": "quick" if args.quick else "full",
        "workers": args.workers,
        "tests": list(args.only),
        "settings": dataclasses.asdict(s),
        "machine": facts,
        "table": [dataclasses.asdict(line) | {"ratio": line.ratio} for line in lines],
        "noise": noise_summary(runs),
        "runs": [dataclasses.asdict(r) for r in runs],
        "profiles": {
            test: {side: dataclasses.asdict(p) for side, p in sides.items()}
            for test, sides in profiles.items()
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print()
    print(
        f"ambimesh vs Envoy {facts['envoy']} HBONE pair, {args.workers} worker(s) each, "
        f"medians of {s.rounds} rounds"
    )
    print(format_table(lines))
    print(format_footer(runs))
    for test, sides in profiles.items():
        for side, p in sides.items():
            print(format_profile(f"ztunnel {side}, {test}", p))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
