"""``python -m bench.same_node [--quick] [--lab NAME]``: same-node bulk throughput, one
iperf3 stream.

Lab ``amfastb`` (or ``--lab``): the bundled cluster (its ztunnels with
``--same-node-fast-path``) plus two pods that are not enrolled, ``legacy/plain-client-2``
and ``legacy/plain-server``, both on node-2 beside ``demo/client-2`` and ``demo/server``;
an iperf3 server in each server pod.

- direct: plain-client-2 -> plain-server (veth -> node-2 bridge -> veth, nothing between)
- fast path: demo/client-2 -> demo/server's pod IP: authorized by ztunnel, then socket to
  socket in the kernel (sk_msg redirect) into ztunnel's delivery inside the server pod
- hbone: the same pair once node-2's ztunnel was restarted without the fast path (TLS,
  HBONE, user space twice, as for any other pair)

Direct and the fast path alternate within each round; the HBONE rounds follow the restart.
Medians over rounds; a JSON record goes to bench/results/. The lab is removed at the end,
also after an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ambimesh.lab import cgroups, procs
from ambimesh.lab.lab import Lab, LabError
from ambimesh.lab.topology import PodPlan
from bench import loadgen
from bench.parsers import listening_ports
from bench.testbed import IPERF_PORT, write_config

LAB_NAME = "amfastb"
RESULTS = Path(__file__).parent / "results"
START_TIMEOUT = 30.0
PLAIN_CLIENT_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "plain-client-2", "namespace": "legacy"},
    "spec": {
        "nodeName": "node-2",
        "containers": [{"name": "shell", "command": ["sleep", "infinity"]}],
    },
}
# (variant, client pod, server pod)
PAIRS = {
    "direct": ("legacy/plain-client-2", "legacy/plain-server"),
    "fast path": ("demo/client-2", "demo/server"),
    "hbone": ("demo/client-2", "demo/server"),
}


def start_iperf3(lab: Lab, pod: PodPlan) -> None:
    log = lab.state / f"iperf3-{pod.namespace}-{pod.name}.log"
    proc = procs.spawn(
        ["iperf3", "-s", "-p", str(IPERF_PORT)],
        cgroup=cgroups.pod_cgroup(lab.name, pod.node, pod.uid),
        netns_name=pod.netns,
        pod=True,
        log=log,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if _listens(proc.pid):
            return
        time.sleep(0.1)
    raise LabError(f"iperf3 in {pod.ref} did not listen on {IPERF_PORT}")


def _listens(pid: int) -> bool:
    """Once ``ip netns exec`` exec'd iperf3, /proc/<pid>/net is the pod's."""
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "ip":
            return False
        tables = [Path(f"/proc/{pid}/net/{t}").read_text() for t in ("tcp", "tcp6")]
    except OSError:
        return False
    return IPERF_PORT in set().union(*map(listening_ports, tables))


def measure(lab: Lab, variant: str, seconds: int) -> float:
    client, server = PAIRS[variant]
    address = lab.load_plan().pod(server).address
    return loadgen.iperf3(lab, client, address, IPERF_PORT, seconds).bits_per_second / 1e9


def run(lab: Lab, rounds: int, seconds: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix=f"{lab.name}-config-") as tmp:
        config = write_config(Path(tmp))
        (config / "zz-same-node.yaml").write_text(yaml.safe_dump(PLAIN_CLIENT_POD))
        lab.up(config_dir=config)
    plan = lab.load_plan()
    for server in {server for _, server in PAIRS.values()}:
        start_iperf3(lab, plan.pod(server))
    gbps: dict[str, list[float]] = {variant: [] for variant in PAIRS}
    for variant in ("direct", "fast path"):
        measure(lab, variant, 1)  # warm-up
    for _ in range(rounds):
        for variant in ("direct", "fast path"):
            gbps[variant].append(measure(lab, variant, seconds))
    lab.same_node_fast_path = False
    lab.restart_component("node-2", "ztunnel")
    measure(lab, "hbone", 1)
    for _ in range(rounds):
        gbps["hbone"].append(measure(lab, "hbone", seconds))
    return gbps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.same_node", description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 rounds of 3 s instead of 3 of 10 s")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--lab", default=LAB_NAME, help=f"lab name (default {LAB_NAME})")
    args = p.parse_args(argv)
    rounds, seconds = (2, 3) if args.quick else (3, 10)
    lab = Lab(args.lab, same_node_fast_path=True)
    try:
        gbps = run(lab, rounds, seconds)
    finally:
        lab.down(quiet=True)
    medians = {variant: statistics.median(values) for variant, values in gbps.items()}
    direct = medians["direct"]
    print(f"same-node bulk, 1 iperf3 stream, median of {rounds} x {seconds} s")
    for variant, value in medians.items():
        print(f"  {variant:<10} {value:6.2f} Gbit/s  {value / direct:6.1%} of direct")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(exist_ok=True)
    record = {"test": "same-node bulk", "rounds": rounds, "seconds": seconds, "gbps": gbps}
    (args.out / f"same-node-{stamp}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
