"""The container image recipe and the systemd units, checked without building or booting:
the structure the docs promise, and command lines the components actually accept."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

from agent.main import parse_args as agent_args
from ambimesh.install.manifests import AGENT_CAPABILITIES, ZTUNNEL_CAPABILITIES
from controller.main import parse_args as controller_args
from ztunnel.main import parse_args as ztunnel_args

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ENV = {"AMBIMESH_NODE": "node-1", "AMBIMESH_CONTROLLER": "c:15012", "AMBIMESH_LOG_LEVEL": "INFO"}


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    text = (DEPLOY / "systemd" / name).read_text().replace("\\\n", " ")
    parser.read_string(text)
    return parser


def exec_start(service: configparser.ConfigParser) -> list[str]:
    argv = shlex.split(service["Service"]["ExecStart"])
    return [re.sub(r"\$\{(\w+)\}", lambda m: ENV[m[1]], a) for a in argv]


def capabilities(service: configparser.ConfigParser) -> list[str]:
    return [c.removeprefix("CAP_") for c in service["Service"]["CapabilityBoundingSet"].split()]


def test_systemd_units_run_the_components_with_the_daemonsets_privileges() -> None:
    controller, agent, ztunnel = (
        unit(f"ambimesh-{c}.service") for c in ("controller", "agent", "ztunnel")
    )
    argv = exec_start(controller)
    assert argv[0] == "/opt/ambimesh/bin/ambimesh-controller"
    parsed = controller_args(argv[1:])
    assert (parsed.config_dir, parsed.tokens) == (
        Path("/etc/ambimesh/config"),
        Path("/etc/ambimesh/tokens.yaml"),
    )
    assert controller["Service"]["User"] == "ambimesh"
    assert capabilities(controller) == []

    agent_argv = exec_start(agent)
    assert agent_args(agent_argv[1:]).node == "node-1"
    assert sorted(capabilities(agent)) == sorted(AGENT_CAPABILITIES)
    assert agent["Service"]["RuntimeDirectoryPreserve"] == "yes"

    parsed_z = ztunnel_args(exec_start(ztunnel)[1:])
    assert parsed_z.agent_socket == agent_args(agent_argv[1:]).socket
    assert capabilities(ztunnel) == ZTUNNEL_CAPABILITIES
    assert ztunnel["Service"]["KillSignal"] == "SIGTERM"
    stop = int(ztunnel["Service"]["TimeoutStopSec"])
    assert parsed_z.drain_seconds < stop <= parsed_z.drain_seconds + 30
    for service in (controller, agent, ztunnel):
        assert service["Service"]["EnvironmentFile"] == "-/etc/default/ambimesh"
        assert service["Service"]["Restart"] == "always"
    env = (DEPLOY / "systemd" / "ambimesh.env").read_text()
    assert set(re.findall(r"^(\w+)=", env, re.M)) == set(ENV)


def test_containerfile_is_multi_stage_non_root_and_registry_free() -> None:
    text = (DEPLOY / "image" / "Containerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert stages == [("${BASE}", "build"), ("${BASE}", "")]
    assert "ARG BASE=localhost/ambimesh-base:bookworm" in text
    runtime = text.split("\nFROM ${BASE}\n", 1)[1]
    assert "COPY --from=build /opt/ambimesh /opt/ambimesh" in runtime
    for package in ("python3-bpfcc", "libbpf1", "linux-headers-amd64"):
        assert package in runtime
    assert "pip install" not in runtime and "--no-index" in text  # wheels only, no PyPI
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    wrapper = (DEPLOY / "image" / "with-kernel-headers").read_text()
    assert "/host/lib/modules/$kver/build" in wrapper and 'exec "$@"' in wrapper
