"""`ambimesh status` without a mesh: reading the agent's real metrics text, finding
problems, the table, and how this host's node and controller are found."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from ambimesh.node_access import (
    CliError,
    Controller,
    read_env_file,
    resolve,
    running_labs,
    this_node,
)
from ambimesh.status import agent_view, problems, table, ztunnel_view

NOW = 1_790_000_000.0  # 2026-09-21, before FUTURE
FUTURE = "2027-01-15T08:00:00+00:00"
PAST = "2020-01-01T00:00:00+00:00"


class Gauges:
    """A collector like the agent's (agent/metrics.py) with fixed values."""

    def __init__(self, **values: float) -> None:
        self.values = values

    def collect(self) -> list[Metric]:
        return [GaugeMetricFamily(f"ambimesh_{k}", k, value=v) for k, v in self.values.items()]


def agent_metrics(**values: float) -> str:
    registry = CollectorRegistry()
    registry.register(Gauges(**values))
    return generate_latest(registry).decode()


def healthy_agent() -> str:
    return agent_metrics(
        enrolled_pods=2,
        pending_pods=0,
        bpf_programs_attached=13,
        config_synced=1,
        ztunnel_connected=1,
    )


def node(name: str, agent_text: str, certs: dict[str, str], serving: bool = True) -> dict[str, Any]:
    dump = {
        "local_pods": [
            {
                "uid": "u1",
                "pod": "demo/client",
                "identity": "spiffe://cluster.local/ns/demo/sa/client",
                "addresses": ["198.19.1.10"],
                "hbone_serving": serving,
            }
        ],
        "certificates": certs,
    }
    return {
        "name": name,
        "ztunnel": {"reachable": True, "error": None},
        **ztunnel_view(dump),
        "agent": {"reachable": True, "error": None, **agent_view(agent_text)},
    }


def status_of(*nodes: dict[str, Any], reachable: bool = True) -> dict[str, Any]:
    controller = {"address": "198.18.0.1:15012", "reachable": reachable, "detail": "TLSv1.3"}
    status = {"lab": "x", "controller": controller, "nodes": list(nodes)}
    status["problems"] = problems(status, NOW)
    return status


def test_agent_gauges_are_read_from_its_metrics_text() -> None:
    assert agent_view(healthy_agent()) == {
        "enrolled_pods": 2,
        "pending_pods": 0,
        "bpf_programs_attached": 13,
        "config_synced": True,
        "ztunnel_connected": True,
    }
    assert agent_view("")["bpf_programs_attached"] is None


def test_healthy_mesh_has_no_problems_and_a_table_per_section() -> None:
    status = status_of(node("node-1", healthy_agent(), {"spiffe://td/ns/demo/sa/client": FUTURE}))
    assert status["problems"] == []
    out = table(status, NOW)
    assert "reachable: TLSv1.3" in out
    rows = out.splitlines()
    assert rows[3].split() == ["node-1", "up", "up", "2", "0", "13", "1"]
    assert any(r.split()[:2] == ["node-1", "demo/client"] for r in rows)
    assert any("spiffe://td/ns/demo/sa/client" in r and FUTURE in r for r in rows)
    assert rows[-1] == "0 problem(s)"


def test_each_fault_is_a_problem_naming_node_and_next_step() -> None:
    sick_agent = agent_metrics(
        enrolled_pods=1,
        pending_pods=1,
        bpf_programs_attached=6,
        config_synced=0,
        ztunnel_connected=0,
    )
    down = {
        "name": "node-2",
        "ztunnel": {"reachable": False, "error": "cannot reach ztunnel admin on node-2"},
        "agent": {"reachable": False, "error": "cannot reach agent metrics on node-2"},
        "pods": [],
        "certificates": [],
    }
    status = status_of(
        node("node-1", sick_agent, {"spiffe://td/ns/demo/sa/client": PAST}, serving=False),
        down,
        reachable=False,
    )
    found = status["problems"]
    assert found[0] == "controller 198.18.0.1:15012: TLSv1.3"
    text = "\n".join(found)
    for part in (
        "node node-1: 1 pod(s) enrolled by the controller are not captured yet",
        "node node-1: the agent has no configuration",
        "node node-1: ztunnel is not connected to the agent",
        "node node-1: ztunnel does not serve HBONE for pod demo/client",
        "node node-1: the certificate of spiffe://td/ns/demo/sa/client expired",
        "cannot reach ztunnel admin on node-2",
        "cannot reach agent metrics on node-2",
    ):
        assert part in text
    assert "DOWN" in table(status, NOW)


def test_this_node_name_order() -> None:
    def host() -> str:
        return "hostname"

    assert this_node({"AMBIMESH_NODE": "a", "NODE_NAME": "b"}, {"AMBIMESH_NODE": "c"}, host) == "a"
    assert this_node({"NODE_NAME": "b"}, {"AMBIMESH_NODE": "c"}, host) == "b"
    assert this_node({}, {"AMBIMESH_NODE": "c"}, host) == "c"
    assert this_node({}, {}, host) == "hostname"


def test_env_file_is_read_like_systemd(tmp_path: Path) -> None:
    env = tmp_path / "ambimesh"
    env.write_text("# comment\n\nAMBIMESH_CONTROLLER=ctl.example:15012\nAMBIMESH_NODE='node-1'\n")
    assert read_env_file(env) == {
        "AMBIMESH_CONTROLLER": "ctl.example:15012",
        "AMBIMESH_NODE": "node-1",
    }
    assert read_env_file(tmp_path / "missing") == {}


def test_running_labs_are_those_with_a_plan(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "plan.json").write_text("{}")
    (tmp_path / "half").mkdir()
    assert running_labs(tmp_path) == ["one"]


def test_another_node_from_this_host_says_where_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMBIMESH_NODE", "node-1")
    args = argparse.Namespace(lab=None, node="node-2", controller=None, root_cert=Path("/x"))
    with pytest.raises(
        CliError, match=r"this host is node 'node-1', not 'node-2'.*run the command on node-2"
    ):
        resolve(args)
    args.node = "node-1"
    scope = resolve(args)
    assert [n.name for n in scope.nodes] == ["node-1"]
    assert scope.nodes[0].netns is None


def test_controller_check_without_a_usable_root_or_address_says_what_to_pass(
    tmp_path: Path,
) -> None:
    bad_root = tmp_path / "root.pem"
    bad_root.write_text("not a certificate")
    reachable, detail = Controller("127.0.0.1:1", None, bad_root).check()
    assert not reachable and "is not a PEM CA certificate" in detail and "--root-cert" in detail
    reachable, detail = Controller("127.0.0.1:1", None, tmp_path / "none.pem").check()
    assert not reachable and "cannot read the mesh root" in detail
    reachable, detail = Controller("", None, bad_root, "pass --controller").check()
    assert (reachable, detail) == (False, "pass --controller")
