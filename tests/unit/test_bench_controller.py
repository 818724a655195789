"""bench.controller_*: the generated configuration (through the real files source and
translation), the wire peek of the simulated nodes, and the latency arithmetic and table."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.controller_clients import Peek, peek
from bench.controller_config import Shape, config_files, namespace_file, tokens_file
from bench.controller_report import (
    Ack,
    Round,
    Summary,
    first_after,
    latencies,
    percentile,
    slowest,
    stats,
    table,
)
from controller.auth import parse_tokens
from controller.sources.files import load_directory
from controller.translate import translate
from mesh.api import mesh_pb2


def write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).write_text(text)


def test_generated_directory_translates_to_every_pod_and_service(tmp_path: Path) -> None:
    shape = Shape(nodes=7, pods=95, namespaces=4, pods_per_service=10)
    write(tmp_path, config_files(shape))
    out = translate(load_directory(tmp_path))
    workloads = [r.workload for r in out.values() if r.HasField("workload")]
    services = [r.service for r in out.values() if r.HasField("service")]
    assert len(workloads) == 95 and all(w.ambient for w in workloads)
    assert {w.node for w in workloads} == {shape.node_name(n) for n in range(7)}
    assert sorted(len(shape.pods_of(n)) for n in range(4)) == [23, 24, 24, 24]
    # 24 pods in tens: services of 10, 10 and 4 pods; each port resolved by name.
    assert len(services) == 4 * 3
    assert sum(len(s.endpoint_uids) for s in services) == 95
    assert {p.target_port for s in services for p in s.ports} == {8080}
    addresses = [a for w in workloads for a in w.addresses] + [
        a for s in services for a in s.addresses
    ]
    assert len(addresses) == len(set(addresses)) == 95 + 12


def test_relabel_changes_only_that_namespace(tmp_path: Path) -> None:
    shape = Shape(nodes=3, pods=30, namespaces=3)
    write(tmp_path, config_files(shape))
    before = translate(load_directory(tmp_path))
    (tmp_path / shape.file_name(1)).write_text(namespace_file(shape, 1, "none"))
    after = translate(load_directory(tmp_path))
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {f"workload/ns-001/pod-{n:05d}" for n in shape.pods_of(1)}
    assert not any(after[k].workload.ambient for k in changed)


def test_tokens_file_is_one_distinct_token_per_node(tmp_path: Path) -> None:
    tokens, text = tokens_file(Shape(nodes=5, pods=5, namespaces=1), "s3cret")
    parsed = parse_tokens(tmp_path / "tokens.yaml", text)
    assert set(parsed) == set(tokens) == {f"node-000{n}" for n in range(5)}
    assert len(set(parsed.values())) == 5


def test_shape_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Shape(nodes=0, pods=1, namespaces=1)
    with pytest.raises(ValueError, match="one /16"):
        Shape(nodes=1, pods=70_000, namespaces=1)


def test_peek_reads_version_and_counts_off_the_wire() -> None:
    resources = [
        mesh_pb2.Resource(key=f"workload/ns/p{n}", workload=mesh_pb2.Workload(name=f"p{n}"))
        for n in range(3)
    ]
    full = mesh_pb2.DiscoveryResponse(version="12", full=True, resources=resources)
    assert peek(full.SerializeToString()) == Peek("12", True, 3, 0)
    delta = mesh_pb2.DiscoveryResponse(version="13", resources=resources[:1], removed=["a", "b"])
    assert peek(delta.SerializeToString()) == Peek("13", False, 1, 2)
    with pytest.raises(ValueError, match="past the end"):
        peek(full.SerializeToString()[:-3])


def ack(node: str, received: float, acked: float) -> Ack:
    return Ack(node, "2", False, 100, 0, received, acked)


def test_latency_from_the_write_to_each_nodes_first_ack_after_it() -> None:
    acks = [ack("a", 1.0, 1.1), ack("a", 5.2, 5.3), ack("a", 6.0, 6.1), ack("b", 5.5, 5.9)]
    answers = first_after(acks, since=5.0)
    assert latencies(answers, 5.0, ["a", "b", "c"]) == pytest.approx({"a": 0.3, "b": 0.9})


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (
        50.0,
        99.0,
        100.0,
    )
    assert stats([3.0, 1.0, 2.0]).p50 == 2.0 and stats([3.0, 1.0, 2.0]).max == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_a_round_is_complete_only_when_every_expected_node_acked() -> None:
    done = Round("ns-000", "none", {"a": 0.4, "b": 0.7}, expected=2, changed=100, rss_mib=90)
    short = Round("ns-001", "none", {"a": 0.5}, expected=2, changed=100, rss_mib=91)
    assert done.all_acked_s == 0.7 and short.all_acked_s is None
    assert slowest([done, short], {"a"}) == [0.4, 0.5]
    assert slowest([done, short], {"a", "b"}) == [0.7]


def test_table_puts_each_number_beside_its_target() -> None:
    healthy = [
        Round(f"ns-{n}", "none", {"a": 0.5 + n / 10, "b": 0.6, "s": 0.6}, 3, 100, 200.0)
        for n in range(3)
    ]
    impaired = [Round("ns-9", "none", {"a": 0.55, "b": 0.65, "s": 2.6}, 3, 100, 210.0)]
    summary = Summary(
        nodes=4,
        pods=40,
        namespaces=2,
        services=4,
        startup_s=3.25,
        startup_cpu_s=2.0,
        startup_rss_mib=180.0,
        healthy=healthy,
        impaired=impaired,
        others={"a", "b"},
        stuck=1,
        slow={"s": 2.0},
        cpu_per_round_s=0.4,
        peak_rss_mib=230.0,
        clients_cpu_s=5.0,
    )
    lines = table(summary).splitlines()

    def row(start: str) -> list[str]:
        return next(line for line in lines if line.strip().startswith(start)).split()

    assert row("first full snapshot")[-1] == "3.25"
    assert row("relabel -> all 4 nodes")[-3:] == ["0.60", "<", "1"]
    assert row("worst round")[-3:] == ["0.70", "<", "1"]
    assert row("with 1 stuck + 1 slow")[-2:] == ["0.65", "~0.60"]
    assert row("slow node")[-1] == "2.60"
    assert row("peak, VmHWM")[-3:] == ["230", "<", "500"]
