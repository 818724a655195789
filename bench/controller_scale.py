"""``python -m bench.controller_scale``: the controller with 1000 nodes and 10,000 pods.

Issue 8's targets (measured, not asserted): after a namespace relabel every node ACKs the
new configuration within 1 s; the controller stays under 500 MB RSS; a slow or stuck node
never delays the others.

The real controller runs as its own process (``python -m controller``, files source, TLS,
join tokens) on a generated YAML directory (bench/controller_config.py). Simulated nodes
(bench/controller_clients.py) connect over real gRPC, one channel and stream each, from a
few processes. Steps:

1. startup: from starting the node processes until every node ACKed its full snapshot;
2. ``--rounds`` relabels, all nodes healthy: one namespace's file is rewritten atomically
   (dotfile + ``os.replace``; the controller skips dotfiles) with ``dataplane-mode``
   flipped; measured from the write to each node's ACK of the next version (every node
   is affected: each holds every workload);
3. the same with ``--stuck`` nodes whose process is stopped (SIGSTOP: they read nothing,
   their TCP windows fill) and ``--slow`` nodes that wait ``--slow-delay`` s before each
   ACK; the others' latency is compared with step 2, and the controller's RSS is read
   after every round.

The controller's CPU seconds and RSS come from /proc. Results go to
bench/results/controller-<time>.json; every process started is stopped at the end, also
after an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.controller_config import Shape, config_files, namespace_file, tokens_file
from bench.controller_report import Ack, Round, Summary, first_after, latencies, table
from bench.parsers import parse_pid_stat_ticks, parse_status_kib
from bench.profile import py_spy
from bench.runner import stop_on_signals

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROUND_GAP = 1.0  # between rounds: two relabels are never coalesced into one version
STOP_TIMEOUT = 10.0


class BenchError(Exception):
    pass


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    user, system = parse_pid_stat_ticks(Path(f"/proc/{pid}/stat").read_text())
    return (user + system) / CLOCK_TICKS


def status_mib(pid: int, field: str) -> float:
    return parse_status_kib(Path(f"/proc/{pid}/status").read_text(), field) / 1024


def atomic_write(path: Path, text: str) -> None:
    """Through a dotfile, which the files source skips, so it never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Clients:
    """One process of simulated nodes and the ACKs it reports."""

    def __init__(self, target: str, root: Path, tokens: dict[str, str], log: Path) -> None:
        self.nodes = list(tokens)
        self.acks: list[Ack] = []
        self._lock = threading.Lock()
        root_arg = ("--root-cert", str(root))
        with log.open("ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.controller_clients", "--target", target, *root_arg],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        assert self.process.stdin is not None
        self.process.stdin.write("".join(f"{n} {t}\n" for n, t in tokens.items()) + "\n")
        self.process.stdin.flush()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            ack = Ack(**json.loads(line))
            with self._lock:
                self.acks.append(ack)

    def snapshot(self, start: int = 0) -> list[Ack]:
        """The ACKs reported, from the ``start``-th on."""
        with self._lock:
            return self.acks[start:]

    def count(self) -> int:
        with self._lock:
            return len(self.acks)

    def command(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self) -> None:
        proc = self.process
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: the process ends its streams and exits
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)


class Run:
    """The controller, its configuration directory and the node processes."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.shape = Shape(args.nodes, args.pods, args.namespaces)
        self.work = work
        self.config = work / "config"
        self.modes = ["ambient"] * self.shape.namespaces
        self.controller: subprocess.Popen[bytes] | None = None
        self.clients: list[Clients] = []
        self.recorder: subprocess.Popen[bytes] | None = None

    def start_controller(self) -> str:
        self.config.mkdir()
        for name, text in config_files(self.shape).items():
            (self.config / name).write_text(text)
        self.tokens, text = tokens_file(self.shape, secrets.token_hex(8))
        tokens = self.work / "tokens.yaml"
        tokens.write_text(text)
        tokens.chmod(0o600)
        port = free_port()
        target = f"127.0.0.1:{port}"
        command = [sys.executable, "-m", "controller", "--config-dir", str(self.config)]
        command += ["--state-dir", str(self.work / "state"), "--tokens", str(tokens)]
        command += ["--listen", target, "--log-level", "INFO"]
        root = self.args.controller_root
        # Metrics on loopback only; a --controller-root older than them has no such flag.
        if "--metrics-listen" in (root / "controller" / "main.py").read_text():
            command += ["--metrics-listen", f"127.0.0.1:{free_port()}"]
        env = os.environ | {"PYTHONPATH": str(root)}
        with (self.work / "controller.log").open("ab") as log:
            self.controller = subprocess.Popen(
                command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        proc = self.controller
        if not wait_for(lambda: proc.poll() is not None or port_open(port), 300, 0.1):
            raise BenchError("the controller did not listen within 300 s")
        if proc.poll() is not None:
            raise BenchError(f"the controller exited: {self.controller_log()}")
        return target

    def controller_log(self) -> str:
        return (self.work / "controller.log").read_text(errors="replace")[-3000:]

    @property
    def pid(self) -> int:
        assert self.controller is not None
        return self.controller.pid

    def start_clients(self, target: str, stuck: list[str]) -> None:
        """Nodes in ``--client-procs`` processes, the stuck ones in one of their own."""
        root = self.work / "state" / "root-cert.pem"
        healthy = [n for n in self.tokens if n not in stuck]
        groups = [healthy[i :: self.args.client_procs] for i in range(self.args.client_procs)]
        if stuck:
            groups.append(stuck)
        log = self.work / "clients.log"
        for group in groups:
            self.clients.append(Clients(target, root, {n: self.tokens[n] for n in group}, log))

    def acks(self) -> list[Ack]:
        return [a for c in self.clients for a in c.snapshot()]

    def check_alive(self) -> None:
        if self.controller is not None and self.controller.poll() is not None:
            raise BenchError(f"the controller exited: {self.controller_log()}")
        for c in self.clients:
            if c.process.poll() is not None:
                raise BenchError(f"a node process exited: see {self.work / 'clients.log'}")

    def relabel(self, number: int, expected: set[str]) -> Round:
        """Flip one namespace's dataplane mode; wait (bounded) for ``expected`` to ACK."""
        ns = number % self.shape.namespaces
        mode = "none" if self.modes[ns] == "ambient" else "ambient"
        self.modes[ns] = mode
        text = namespace_file(self.shape, ns, mode)
        path = self.config / self.shape.file_name(ns)
        # Only the ACKs reported from now on: sorting every ACK of the run 20 times a
        # second would take CPU from the controller and the nodes it measures.
        starts = [c.count() for c in self.clients]
        written = time.monotonic()
        atomic_write(path, text)

        def answered() -> dict[str, Ack]:
            self.check_alive()
            new = [
                a for c, start in zip(self.clients, starts, strict=True) for a in c.snapshot(start)
            ]
            return first_after(new, written)

        wait_for(lambda: expected <= answered().keys(), self.args.round_timeout, 0.05)
        answers = answered()
        changed = [a.resources for a in answers.values()]
        return Round(
            self.shape.namespace_name(ns),
            mode,
            latencies(answers, written, expected),
            len(expected),
            max(set(changed), key=changed.count) if changed else 0,
            status_mib(self.pid, "VmRSS"),
        )

    def profile(self, out: Path) -> subprocess.Popen[bytes]:
        """py-spy on the controller until SIGINT: the stack of the thread holding the GIL
        (Python and native frames, e.g. gRPC's ``sendmsg``), as collapsed stacks. It pauses
        the process for each sample: the rounds recorded are a bit slower."""
        argv = [str(py_spy()), "record", "--pid", str(self.pid), "--rate", "100", "--gil"]
        argv += ["--native", "--format", "raw", "--output", str(out)]
        self.recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches
        return self.recorder

    def stop(self) -> None:
        if self.recorder is not None and self.recorder.poll() is None:
            self.recorder.kill()
            self.recorder.wait(STOP_TIMEOUT)
        for c in self.clients:
            c.stop()
        if self.controller is not None and self.controller.poll() is None:
            self.controller.send_signal(signal.SIGTERM)
            try:
                self.controller.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait(STOP_TIMEOUT)


def machine() -> dict[str, str]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
    ).stdout.strip()
    return {
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "load_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


def measure(args: argparse.Namespace, run: Run) -> tuple[Summary, dict[str, object]]:
    shape = run.shape
    nodes = [shape.node_name(n) for n in range(shape.nodes)]
    stuck = nodes[len(nodes) - args.stuck :] if args.stuck else []
    slow = nodes[: args.slow]
    others = set(nodes) - set(stuck) - set(slow)
    target = run.start_controller()
    started = time.monotonic()
    cpu0 = cpu_seconds(run.pid)
    run.start_clients(target, stuck)

    def full_acks() -> dict[str, Ack]:
        run.check_alive()
        return {a.node: a for a in run.acks() if a.full}

    print(f"controller up (pid {run.pid}); {len(nodes)} nodes connecting", flush=True)
    wait_for(lambda: len(full_acks()) == len(nodes), args.start_timeout, 0.1)
    fulls = full_acks()
    startup = max(a.acked for a in fulls.values()) - started if len(fulls) == len(nodes) else None
    startup_cpu = cpu_seconds(run.pid) - cpu0
    time.sleep(ROUND_GAP)
    startup_rss = status_mib(run.pid, "VmRSS")
    print(f"startup: {startup} s, {len(fulls)} of {len(nodes)} nodes", flush=True)

    healthy: list[Round] = []
    recorder = run.profile(args.profile) if args.profile is not None else None
    cpu1 = cpu_seconds(run.pid)
    for number in range(args.rounds):
        healthy.append(run.relabel(number, set(nodes)))
        print(f"relabel {number + 1}: {healthy[-1].all_acked_s} s", flush=True)
        time.sleep(ROUND_GAP)
    cpu_per_round = (cpu_seconds(run.pid) - cpu1) / max(1, args.rounds)
    if recorder is not None:
        recorder.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        recorder.wait(STOP_TIMEOUT)

    stuck_group = run.clients[-1] if stuck else None
    if stuck_group is not None:
        os.kill(stuck_group.process.pid, signal.SIGSTOP)
    for node in slow:
        next(c for c in run.clients if node in c.nodes).command(f"slow {node} {args.slow_delay}")
    impaired: list[Round] = []
    if stuck or slow:
        time.sleep(ROUND_GAP)
        for number in range(args.rounds, 2 * args.rounds):
            impaired.append(run.relabel(number, others | set(slow)))
            others_s = [impaired[-1].latency.get(n) for n in others]
            last = None if None in others_s else max(s for s in others_s if s is not None)
            print(f"relabel {number + 1} (stuck + slow): others {last} s", flush=True)
            time.sleep(ROUND_GAP)
    summary = Summary(
        nodes=shape.nodes,
        pods=shape.pods,
        namespaces=shape.namespaces,
        services=sum(
            -(-len(shape.pods_of(n)) // shape.pods_per_service) for n in range(shape.namespaces)
        ),
        startup_s=startup,
        startup_cpu_s=startup_cpu,
        startup_rss_mib=startup_rss,
        healthy=healthy,
        impaired=impaired,
        others=others,
        stuck=len(stuck),
        slow={n: args.slow_delay for n in slow},
        cpu_per_round_s=cpu_per_round,
        peak_rss_mib=status_mib(run.pid, "VmHWM"),
        clients_cpu_s=sum(cpu_seconds(c.process.pid) for c in run.clients),
    )
    extra: dict[str, object] = {"controller_cpu_total_s": cpu_seconds(run.pid) - cpu0}
    return summary, extra


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.controller_scale", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="100 nodes, 1000 pods, 3 rounds")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5, help="relabels per step (5)")
    p.add_argument("--stuck", type=int, default=10, help="nodes that stop reading (10)")
    p.add_argument("--slow", type=int, default=1, help="nodes that delay their ACKs (1)")
    p.add_argument("--slow-delay", type=float, default=2.0, help="their delay, s (2)")
    p.add_argument("--client-procs", type=int, default=2, help="processes of healthy nodes (2)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--round-timeout", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="py-spy the controller during the healthy relabels into FILE (collapsed stacks)",
    )
    p.add_argument(
        "--controller-root",
        type=Path,
        default=REPO,
        help="run the controller from this checkout (e.g. a worktree of an older commit)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.pods, args.namespaces, args.rounds = 100, 1000, 10, 3
        args.stuck = min(args.stuck, 2)
    if args.stuck + args.slow >= args.nodes or args.client_procs < 1:
        p.error("need more nodes than --stuck + --slow, and at least one client process")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    facts = machine()
    with tempfile.TemporaryDirectory(prefix="ambimesh-ctlbench-") as tmp:
        run = Run(args, Path(tmp))
        try:
            summary, extra = measure(args, run)
        except BenchError as e:
            print(f"bench.controller_scale: {e}", file=sys.stderr)
            return 1
        finally:
            run.stop()
    result = {
        "started": stamp,
        "settings": vars(args)
        | {"out": str(args.out), "controller_root": str(args.controller_root)}
        | {"profile": str(args.profile) if args.profile else None},
        "machine": facts,
        "summary": dataclasses.asdict(summary) | {"others": len(summary.others)},
        **extra,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"controller-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print()
    print(table(summary))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
