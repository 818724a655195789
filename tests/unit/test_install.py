"""`ambimesh install`: every object valid against the Kubernetes schemas, the node pod's
privileges exactly the documented ones, the Helm chart saying what --dry-run says, and the
checked-in chart and manifests up to date."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ambimesh.install import (
    DEFAULT_NAMESPACE,
    ValuesError,
    default_values,
    load_values,
    manifests,
    render,
)
from ambimesh.install.chart import chart_files, generated
from ambimesh.install.manifests import AGENT_CAPABILITIES, CONTROLLER_RULES, ZTUNNEL_CAPABILITIES
from tests.unit import helm_subset

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = kubernetes_validate.latest_version()
# Variations a user would make: everything optional on, custom scheduling and sizes.
CUSTOM_SETS = [
    "serviceMonitor.enabled=true",
    "serviceMonitor.interval=15s",
    "node.drainSeconds=600",
    "node.tolerations=[{key: dedicated, operator: Equal, value: mesh, effect: NoSchedule}]",
    "node.nodeSelector={pool: mesh}",
    "controller.resources={requests: {cpu: 1}}",
    "image.repository=registry.example/ambimesh",
    "image.tag=1.2.3",
    "logLevel=DEBUG",
    "trustDomain=example.org",
]


def by_kind(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return obj


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(load_values(sets=["serviceMonitor.enabled=true"]))


@pytest.fixture(scope="module")
def node_pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec = by_kind(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod["containers"]}


@pytest.mark.parametrize("sets", [[], CUSTOM_SETS], ids=["defaults", "custom"])
def test_every_object_is_valid_against_the_kubernetes_schemas(sets: list[str]) -> None:
    kinds = []
    for obj in render(load_values(sets=sets)):
        kinds.append(obj["kind"])
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD kubernetes-validate has no schema for: checked below
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message}")
    assert sorted(set(kinds)) == sorted(
        {
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Service",
            "Deployment",
            "DaemonSet",
            *(["ServiceMonitor"] if sets else []),
        }
    )


def test_service_monitors_scrape_the_node_and_controller_metrics_ports(
    objects: list[dict[str, Any]],
) -> None:
    expected = {
        "ambimesh-node": (
            "ambimesh-node-metrics",
            {"ztunnel-metrics": 15020, "agent-metrics": 15014},
        ),
        "ambimesh-controller": ("ambimesh-controller", {"http-monitoring": 15016}),
    }
    for name, (service_name, metrics_ports) in expected.items():
        monitor = by_kind(objects, "ServiceMonitor", name)
        service = by_kind(objects, "Service", service_name)
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items()
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        assert metrics_ports.items() <= ports.items()
        assert {e["port"] for e in monitor["spec"]["endpoints"]} == set(metrics_ports)
    controller = by_kind(objects, "Deployment", "ambimesh-controller")["spec"]["template"]
    (container,) = controller["spec"]["containers"]
    assert {"name": "http-monitoring", "containerPort": 15016} in container["ports"]
    assert "--metrics-listen=0.0.0.0:15016" in container["args"]
    assert controller["metadata"]["annotations"]["prometheus.io/port"] == "15016"
    assert "ServiceMonitor" not in {o["kind"] for o in render(default_values())}


def test_node_daemonset_privileges_are_the_documented_minimum(node_pod: dict[str, Any]) -> None:
    assert node_pod["hostPID"] is True  # /proc discovery of pod processes
    assert node_pod["hostNetwork"] is False
    assert node_pod["automountServiceAccountToken"] is False
    assert node_pod["priorityClassName"] == "system-node-critical"
    assert node_pod["tolerations"] == [{"operator": "Exists"}]
    by_name = containers(node_pod)
    assert set(by_name) == {"agent", "ztunnel"}
    expected = {"agent": AGENT_CAPABILITIES, "ztunnel": ZTUNNEL_CAPABILITIES}
    assert sorted(AGENT_CAPABILITIES) == ["BPF", "NET_ADMIN", "SYS_PTRACE"]
    assert ZTUNNEL_CAPABILITIES == ["SYS_ADMIN"]
    for name, container in by_name.items():
        security = container["securityContext"]
        assert security["privileged"] is False
        assert security["capabilities"] == {"drop": ["ALL"], "add": expected[name]}
        assert security["readOnlyRootFilesystem"] is True
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "hostPort" not in str(container["ports"])


def test_node_daemonset_mounts(node_pod: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in node_pod["volumes"]}
    mounts = {
        c: {m["mountPath"]: m for m in x["volumeMounts"]} for c, x in containers(node_pod).items()
    }
    host = {v["hostPath"]["path"]: name for name, v in volumes.items() if "hostPath" in v}
    assert host == {
        "/var/run/ambimesh": "run",
        "/sys/fs/bpf": "bpffs",
        "/sys/fs/cgroup": "cgroup",
        "/var/run/netns": "netns",
        "/lib/modules": "host-modules",
    }
    agent, ztunnel = mounts["agent"], mounts["ztunnel"]
    assert agent["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert agent["/sys/fs/cgroup"]["readOnly"] is True
    assert agent["/var/run/netns"]["readOnly"] is True
    assert "emptyDir" in volumes[agent["/lib/modules"]["name"]]
    # The socket dir is shared by both containers *and* by the next pod generation.
    assert agent["/var/run/ambimesh"]["name"] == ztunnel["/var/run/ambimesh"]["name"] == "run"
    # ztunnel needs no host path but the socket dir.
    assert {volumes[m["name"]].get("hostPath", {}).get("path") for m in ztunnel.values()} == {
        "/var/run/ambimesh",
        None,
    }
    (source,) = volumes["node-token"]["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "ambimesh"
    assert agent["/var/run/secrets/ambimesh"]["readOnly"] is True


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def test_rolling_update_keeps_capture_and_drain_matches_grace(node_pod: dict[str, Any]) -> None:
    for sets in ([], ["node.drainSeconds=120"]):
        daemonset = by_kind(render(load_values(sets=sets)), "DaemonSet")
        strategy = daemonset["spec"]["updateStrategy"]
        assert strategy == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        }
        pod = daemonset["spec"]["template"]["spec"]
        ztunnel = containers(pod)["ztunnel"]
        assert pod["terminationGracePeriodSeconds"] == int(flag(ztunnel["args"], "drain-seconds"))
    by_name = containers(node_pod)
    agent, ztunnel = by_name["agent"], by_name["ztunnel"]
    # One agent per node at a time (flock on the shared dir), serving every ztunnel.
    assert agent["command"][:2] == ["flock", "/var/run/ambimesh/agent.lock"]
    assert flag(agent["args"], "socket") == flag(ztunnel["args"], "agent-socket")
    assert flag(agent["args"], "socket").startswith("/var/run/ambimesh/")
    probe = ztunnel["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz/ready", 15021)
    annotations = by_kind(render(default_values()), "DaemonSet")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "15020",
        "prometheus.io/path": "/metrics",
    }


def test_controller_rbac_is_read_only_plus_token_reviews(objects: list[dict[str, Any]]) -> None:
    role = by_kind(objects, "ClusterRole")
    assert role["rules"] == CONTROLLER_RULES
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    writes = {g for g in granted if g[2] not in ("get", "list", "watch")}
    assert writes == {("authentication.k8s.io", "tokenreviews", "create")}
    assert "*" not in str(role["rules"])
    assert not any(r in ("secrets", "configmaps") for _, r, _ in granted)
    read = {(g, r) for g, r, v in granted if v == "watch"}
    assert read == {
        ("", "namespaces"),
        ("", "pods"),
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("security.istio.io", "peerauthentications"),
        ("security.istio.io", "authorizationpolicies"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("ambimesh.io", "ratelimits"),
    }
    binding = by_kind(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ambimesh-controller", "namespace": DEFAULT_NAMESPACE}
    ]


def test_controller_runs_unprivileged_and_nodes_never_see_the_root_key(
    objects: list[dict[str, Any]], node_pod: dict[str, Any]
) -> None:
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert "ambimesh-ca" in secrets
    assert not any("secret" in v for v in node_pod["volumes"])
    service = by_kind(objects, "Service", "ambimesh-controller")
    assert service["spec"]["ports"][0]["port"] == 15012
    controller = containers(node_pod)["agent"]
    assert flag(controller["args"], "controller") == (
        f"ambimesh-controller.{DEFAULT_NAMESPACE}.svc:15012"
    )


def chart_render(values: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """What `helm template` makes of the chart, through tests/unit/helm_subset.py."""
    out = []
    for path, text in sorted(chart_files().items()):
        if path.startswith("templates/"):
            out += [d for d in yaml.safe_load_all(helm_subset.render(text, values, namespace)) if d]
    return out


@pytest.mark.parametrize("sets", [[], CUSTOM_SETS], ids=["defaults", "custom"])
def test_the_helm_chart_renders_the_same_objects_as_dry_run(sets: list[str]) -> None:
    values = load_values(sets=sets)
    expected = [m.obj for m in manifests(values, "mesh") if m.chart and not m.crd]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(chart_render(values, "mesh"), key=key) == sorted(expected, key=key)


def test_chart_crds_and_values_are_the_installs() -> None:
    files = chart_files()
    crd = yaml.safe_load(files["crds/ratelimits.ambimesh.io.yaml"])
    assert crd == by_kind(render(default_values()), "CustomResourceDefinition")
    assert yaml.safe_load(files["values.yaml"]) == default_values()
    chart = yaml.safe_load(files["Chart.yaml"])
    assert (chart["apiVersion"], chart["name"]) == ("v2", "ambimesh")


def test_checked_in_chart_and_manifests_are_up_to_date() -> None:
    deploy = REPO / "deploy"
    stale = [
        str(path.relative_to(REPO))
        for path, text in generated(deploy).items()
        if not path.exists() or path.read_text("utf-8") != text
    ]
    on_disk = {
        p for sub in ("templates", "crds") for p in (deploy / "helm" / "ambimesh" / sub).glob("*")
    }
    extra = sorted(str(p) for p in on_disk - set(generated(deploy)))
    assert not stale and not extra, f"run `make deploy`: stale {stale}, extra {extra}"


def test_values_files_and_sets_overlay_the_defaults(tmp_path: Path) -> None:
    override = tmp_path / "mine.yaml"
    override.write_text("node:\n  drainSeconds: 30\n  nodeSelector: {pool: a}\n")
    values = load_values([override], ["node.bpfPinDir=/sys/fs/bpf/x", "serviceMonitor.enabled=yes"])
    assert values["node"]["drainSeconds"] == 30
    assert values["node"]["nodeSelector"] == {"pool": "a"}  # replaced whole, not merged
    assert values["node"]["tokenAudience"] == "ambimesh"  # untouched siblings stay
    assert values["serviceMonitor"]["enabled"] is True
    for bad in (["node.drainSecond=1"], ["node=1"], ["novalue"]):
        with pytest.raises(ValuesError):
            load_values(sets=bad)
    override.write_text("- a list\n")
    with pytest.raises(ValuesError, match="must be a mapping"):
        load_values([override])


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ambimesh", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )


def test_cli_dry_run_prints_the_rendered_manifests() -> None:
    result = run_cli("install", "--dry-run", "-n", "mesh", "--set", "node.drainSeconds=60")
    assert result.returncode == 0, result.stderr
    printed = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert printed == render(load_values(sets=["node.drainSeconds=60"]), "mesh")
    bad = run_cli("install", "--dry-run", "--set", "node.nope=1")
    assert bad.returncode == 2
    assert "unknown value 'node.nope'" in bad.stderr


def test_cli_install_applies_with_kubectl(tmp_path: Path) -> None:
    fake = tmp_path / "kubectl"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\ncat > {tmp_path}/applied\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = run_cli("install", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "argv").read_text().split() == ["apply", "-f", "-"]
    applied = [d for d in yaml.safe_load_all((tmp_path / "applied").read_text()) if d]
    assert applied == render(default_values())


def test_cli_create_ca_writes_a_root_once(tmp_path: Path) -> None:
    result = run_cli("install", "--create-ca", str(tmp_path / "ca"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ca" / "root-key.pem").stat().st_mode & 0o777 == 0o600
    assert "create secret generic ambimesh-ca" in result.stdout
    assert run_cli("install", "--create-ca", str(tmp_path / "ca")).returncode == 1


def test_every_container_command_line_parses_with_its_component(
    objects: list[dict[str, Any]], node_pod: dict[str, Any]
) -> None:
    """The flags the manifests pass are the ones the components take (argparse exits on
    an unknown or missing one)."""
    from agent.main import parse_args as agent_args
    from controller.main import parse_args as controller_args
    from ztunnel.main import parse_args as ztunnel_args

    def argv(container: dict[str, Any]) -> list[str]:
        return [a.replace("$(NODE_NAME)", "node-1") for a in container["args"]]

    by_name = containers(node_pod)
    assert by_name["agent"]["command"][-1] == "ambimesh-agent"
    assert agent_args(argv(by_name["agent"])).bpf_pin_dir == "/sys/fs/bpf/ambimesh"
    assert by_name["ztunnel"]["command"] == ["ambimesh-ztunnel"]
    assert ztunnel_args(argv(by_name["ztunnel"])).drain_seconds == 3600
    (controller,) = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert controller["command"] == ["ambimesh-controller"]
    parsed = controller_args(argv(controller))
    assert parsed.node_service_accounts == [f"{DEFAULT_NAMESPACE}/ambimesh-node"]
