"""Translation of Kubernetes-style objects, table-driven, no I/O."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from controller.translate import (
    ConfigError,
    Settings,
    SourcedObject,
    pod_uid,
    resource_key,
    translate,
)
from mesh.api import mesh_pb2

SEED_PEER_AUTHENTICATION = """\
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
"""


def ns(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    }


def pod(
    name: str,
    namespace: str = "demo",
    labels: dict[str, Any] | None = None,
    ip: str | None = "10.0.0.5",
    node: str | None = "node-a",
    **extra: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {"nodeName": node} if node else {},
        "status": {"podIP": ip} if ip else {},
    }
    for key, value in extra.items():
        obj.setdefault(key, {}).update(value)
    return obj


def service(name: str, selector: dict[str, str], ports: Any, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"selector": selector, "ports": ports, "clusterIP": "10.96.0.10", **spec},
    }


def run(*objects: dict[str, Any], settings: Settings | None = None) -> dict[str, mesh_pb2.Resource]:
    return translate(
        [SourcedObject(o, f"cfg.yaml#{i + 1}") for i, o in enumerate(objects)], settings
    )


def workload(
    resources: dict[str, mesh_pb2.Resource], name: str, namespace: str = "demo"
) -> mesh_pb2.Workload:
    return resources[resource_key("workload", namespace, name)].workload


@pytest.mark.parametrize(
    ("ns_labels", "pod_labels", "ambient"),
    [
        ({}, {}, False),
        ({"ambimesh.io/dataplane-mode": "ambient"}, {}, True),
        ({"istio.io/dataplane-mode": "ambient"}, {}, True),
        ({}, {"istio.io/dataplane-mode": "ambient"}, True),
        ({"ambimesh.io/dataplane-mode": "ambient"}, {"ambimesh.io/dataplane-mode": "none"}, False),
        ({"istio.io/dataplane-mode": "none"}, {"ambimesh.io/dataplane-mode": "ambient"}, True),
        ({"ambimesh.io/dataplane-mode": "ambient"}, {"istio.io/dataplane-mode": "none"}, False),
    ],
)
def test_enrollment_pod_label_wins_over_namespace(
    ns_labels: dict[str, str], pod_labels: dict[str, str], ambient: bool
) -> None:
    out = run(ns("demo", ns_labels), pod("web", labels=pod_labels))
    assert workload(out, "web").ambient is ambient


@pytest.mark.parametrize(
    ("ns_labels", "pod_labels", "waypoint"),
    [
        ({}, {}, ""),
        ({"istio.io/use-waypoint": "ns-wp"}, {}, "demo/ns-wp"),
        ({"istio.io/use-waypoint": "ns-wp"}, {"ambimesh.io/use-waypoint": "pod-wp"}, "demo/pod-wp"),
        ({"istio.io/use-waypoint": "ns-wp"}, {"istio.io/use-waypoint": "none"}, ""),
    ],
)
def test_waypoint_label(
    ns_labels: dict[str, str], pod_labels: dict[str, str], waypoint: str
) -> None:
    """A pod's waypoint (one that takes workload traffic); more in test_waypoint_translate."""
    gateways = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {
                "name": name,
                "namespace": "demo",
                "labels": {"istio.io/waypoint-for": "all"},
            },
            "spec": {"gatewayClassName": "istio-waypoint"},
        }
        for name in ("ns-wp", "pod-wp")
    ]
    out = run(ns("demo", ns_labels), pod("web", labels=pod_labels), *gateways)
    assert workload(out, "web").waypoint == waypoint


def test_pod_fields() -> None:
    p = pod(
        "web-7d9f8b6c5d-x2x9z",
        labels={"app": "web", "pod-template-hash": "7d9f8b6c5d"},
        metadata={
            "uid": "1111-2222",
            "ownerReferences": [
                {"kind": "ReplicaSet", "name": "web-7d9f8b6c5d", "controller": True}
            ],
        },
        spec={"serviceAccountName": "web-sa"},
        status={"podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]},
    )
    w = workload(run(p), "web-7d9f8b6c5d-x2x9z")
    assert w.uid == "1111-2222"
    assert w.service_account == "web-sa"
    assert w.node == "node-a"
    assert list(w.addresses) == ["10.0.0.5", "fd00::5"]
    assert w.workload_name == "web"
    assert w.trust_domain == "cluster.local"
    assert dict(w.labels) == {"app": "web", "pod-template-hash": "7d9f8b6c5d"}


@pytest.mark.parametrize(
    ("owners", "labels", "expected"),
    [
        ([], {}, "solo"),
        ([{"kind": "StatefulSet", "name": "db"}], {}, "db"),
        ([{"kind": "ReplicaSet", "name": "api-5f7c9d8b4"}], {}, "api"),
        ([{"kind": "ReplicaSet", "name": "api-v2"}], {"pod-template-hash": "abc"}, "api-v2"),
    ],
)
def test_workload_name(owners: list[dict[str, str]], labels: dict[str, str], expected: str) -> None:
    p = pod("solo", labels=labels, metadata={"ownerReferences": owners})
    assert workload(run(p), "solo").workload_name == expected


def test_defaults_uid_service_account_and_trust_domain() -> None:
    w = workload(run(pod("web"), settings=Settings(trust_domain="example.org")), "web")
    assert w.uid == pod_uid("demo", "web")
    assert w.uid == pod_uid("demo", "web") != pod_uid("other", "web")
    assert w.service_account == "default"
    assert w.trust_domain == "example.org"


@pytest.mark.parametrize("missing", [{"ip": None}, {"node": None}])
def test_pod_without_ip_or_node_is_not_a_workload(missing: dict[str, Any]) -> None:
    assert run(pod("pending", **missing)) == {}


def test_service_selects_pods_in_its_namespace() -> None:
    out = run(
        pod("web-1", labels={"app": "web"}, ip="10.0.0.1", metadata={"uid": "u1"}),
        pod("web-2", labels={"app": "web", "v": "2"}, ip="10.0.0.2", metadata={"uid": "u2"}),
        pod("web-pending", labels={"app": "web"}, ip=None, metadata={"uid": "u3"}),
        pod("other", labels={"app": "other"}, ip="10.0.0.4", metadata={"uid": "u4"}),
        pod("web-elsewhere", "prod", {"app": "web"}, ip="10.0.0.5", metadata={"uid": "u5"}),
        service("web", {"app": "web"}, [{"port": 80, "targetPort": 8080, "name": "http"}]),
    )
    svc = out["service/demo/web"].service
    assert list(svc.endpoint_uids) == ["u1", "u2"]
    assert svc.hostname == "web.demo.svc.cluster.local"
    assert list(svc.addresses) == ["10.96.0.10"]
    assert [(p.port, p.target_port, p.name) for p in svc.ports] == [(80, 8080, "http")]


def test_service_target_port_defaults_and_names() -> None:
    p = pod(
        "web",
        labels={"app": "web"},
        spec={
            "containers": [{"name": "c", "ports": [{"name": "http-alt", "containerPort": 9090}]}]
        },
    )
    svc = run(
        p,
        service("web", {"app": "web"}, [{"port": 80}, {"port": 81, "targetPort": "http-alt"}]),
        settings=Settings(cluster_domain="mesh.test"),
    )["service/demo/web"].service
    assert [(x.port, x.target_port) for x in svc.ports] == [(80, 80), (81, 9090)]
    assert svc.hostname == "web.demo.svc.mesh.test"


def test_headless_service_has_no_address() -> None:
    svc = run(service("db", {}, [{"port": 5432}], clusterIP="None"))["service/demo/db"].service
    assert list(svc.addresses) == []
    assert list(svc.endpoint_uids) == []


def test_seed_peer_authentication_unchanged() -> None:
    out = run(yaml.safe_load(SEED_PEER_AUTHENTICATION))
    assert list(out) == ["peer_authentication/istio-system/default"]
    pa = out["peer_authentication/istio-system/default"].peer_authentication
    assert pa.scope == mesh_pb2.MESH
    assert pa.mode == mesh_pb2.STRICT
    assert pa.name == "default"
    assert pa.namespace == "istio-system"


def peer_auth(
    namespace: str, spec: dict[str, Any], api: str = "security.istio.io/v1"
) -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": "PeerAuthentication",
        "metadata": {"name": "pa", "namespace": namespace},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("namespace", "spec", "scope", "mode", "selector", "ports"),
    [
        (
            "istio-system",
            {"mtls": {"mode": "PERMISSIVE"}},
            mesh_pb2.MESH,
            mesh_pb2.PERMISSIVE,
            {},
            {},
        ),
        ("demo", {"mtls": {"mode": "DISABLE"}}, mesh_pb2.NAMESPACE, mesh_pb2.DISABLE, {}, {}),
        ("demo", {}, mesh_pb2.NAMESPACE, mesh_pb2.MTLS_MODE_UNSET, {}, {}),
        (
            "demo",
            {"selector": {"matchLabels": {}}},
            mesh_pb2.NAMESPACE,
            mesh_pb2.MTLS_MODE_UNSET,
            {},
            {},
        ),
        (
            "istio-system",
            {"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "UNSET"}},
            mesh_pb2.WORKLOAD,
            mesh_pb2.MTLS_MODE_UNSET,
            {"app": "web"},
            {},
        ),
        (
            "demo",
            {
                "selector": {"matchLabels": {"app": "web"}},
                "mtls": {"mode": "STRICT"},
                "portLevelMtls": {8080: {"mode": "PERMISSIVE"}, "9090": {"mode": "DISABLE"}},
            },
            mesh_pb2.WORKLOAD,
            mesh_pb2.STRICT,
            {"app": "web"},
            {8080: mesh_pb2.PERMISSIVE, 9090: mesh_pb2.DISABLE},
        ),
    ],
)
def test_peer_authentication(
    namespace: str,
    spec: dict[str, Any],
    scope: int,
    mode: int,
    selector: dict[str, str],
    ports: dict[int, int],
) -> None:
    pa = run(peer_auth(namespace, spec))[f"peer_authentication/{namespace}/pa"].peer_authentication
    assert (pa.scope, pa.mode, dict(pa.selector), dict(pa.port_modes)) == (
        scope,
        mode,
        selector,
        ports,
    )


def test_root_namespace_is_a_setting() -> None:
    pa = run(peer_auth("mesh-root", {}), settings=Settings(root_namespace="mesh-root"))
    assert pa["peer_authentication/mesh-root/pa"].peer_authentication.scope == mesh_pb2.MESH


def test_unknown_kinds_are_ignored() -> None:
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r"},
    }
    old_pa = peer_auth("demo", {}, api="security.istio.io/v1alpha1")
    assert run(route, old_pa, {"apiVersion": "apps/v1", "kind": "Deployment"}) == {}


@pytest.mark.parametrize(
    ("obj", "fragments"),
    [
        (
            peer_auth("demo", {"mtls": {"mode": "STRICTER"}}),
            ["PeerAuthentication demo/pa", "spec.mtls.mode", "STRICTER"],
        ),
        (peer_auth("demo", {"mtls": "STRICT"}), ["spec.mtls", "must be a mapping"]),
        (
            peer_auth("demo", {"portLevelMtls": {80: {"mode": "STRICT"}}}),
            ["spec.portLevelMtls", "requires spec.selector"],
        ),
        (
            peer_auth(
                "demo",
                {
                    "selector": {"matchLabels": {"a": "b"}},
                    "portLevelMtls": {"http": {"mode": "STRICT"}},
                },
            ),
            ["spec.portLevelMtls[http]", "not a port number"],
        ),
        (
            pod("web", labels={"ambimesh.io/dataplane-mode": "sidecar"}),
            ["Pod demo/web", "dataplane-mode", "sidecar"],
        ),
        (pod("web", ip="10.0.0.300"), ["Pod demo/web", "status.podIP", "not an IP address"]),
        (
            pod("web", metadata={"labels": ["a"]}),
            ["Pod demo/web", "metadata.labels", "must be a mapping"],
        ),
        (
            service("web", {}, [{"port": 70000}]),
            ["Service demo/web", "spec.ports[0].port", "70000"],
        ),
        (service("web", {}, "80"), ["spec.ports", "must be a list"]),
        (
            pod("web", labels={"version": 2}),
            ["metadata.labels[version]", "must be strings", "quote it"],
        ),
        (
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "demo"}},
            ["metadata.name", "is required"],
        ),
    ],
)
def test_errors_name_source_object_and_field(obj: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        run(ns("demo"), obj)
    message = str(info.value)
    assert message.startswith("cfg.yaml#2: ")
    for fragment in fragments:
        assert fragment in message


def test_duplicate_object_names_both_sources() -> None:
    with pytest.raises(
        ConfigError,
        match=r"cfg.yaml#2: Pod demo/web: metadata.name: defined twice \(first in cfg.yaml#1\)",
    ):
        run(pod("web"), pod("web"))


def test_namespace_defaults_to_default() -> None:
    p = pod("web")
    del p["metadata"]["namespace"]
    assert workload(run(p), "web", namespace="default").namespace == "default"


def test_named_target_port_no_pod_declares_drops_the_port_not_the_config(
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = run(
        ns("demo"),
        pod("web", labels={"app": "web"}),
        service("web", {"app": "web"}, [{"port": 80, "targetPort": "http"}, {"port": 81}]),
    )
    svc = out["service/demo/web"].service
    assert [(p.port, p.target_port) for p in svc.ports] == [(81, 81)]
    assert "cfg.yaml#3: Service demo/web: spec.ports[0].targetPort" in caplog.text
    assert "'http'" in caplog.text


def test_named_target_port_with_two_numbers_is_an_error() -> None:
    def web(name: str, ip: str, number: int) -> dict[str, Any]:
        containers = [{"name": "c", "ports": [{"name": "http", "containerPort": number}]}]
        return pod(name, labels={"app": "web"}, ip=ip, spec={"containers": containers})

    with pytest.raises(
        ConfigError, match=r"named port 'http': selected pods disagree .*8080, 9090"
    ):
        run(
            ns("demo"),
            web("web-1", "10.0.0.5", 8080),
            web("web-2", "10.0.0.6", 9090),
            service("web", {"app": "web"}, [{"port": 80, "targetPort": "http"}]),
        )


# --- hostile values: errors quote a bounded part, odd types are errors, not crashes -------


def alias_bomb(levels: int) -> list[Any]:
    """What YAML aliases build: 10**levels items in print, a few dozen objects in memory."""
    value: list[Any] = ["lol"] * 10
    for _ in range(levels - 1):
        value = [value] * 10
    return value


def selected_pa(spec: dict[str, Any]) -> dict[str, Any]:
    return peer_auth("demo", {"selector": {"matchLabels": {"app": "web"}}, **spec})


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda v: pod("web", status={"podIPs": [{"ip": v}]}), "status.podIPs[0].ip"),
        (lambda v: pod("web", ip=None, status={"podIPs": [{"ip": str(v)}]}), "not an IP"),
        (lambda v: service("web", {}, [{"port": v}]), "spec.ports[0].port"),
        (lambda v: selected_pa({"portLevelMtls": {80: {"mode": v}}}), "portLevelMtls[80].mode"),
        (lambda v: selected_pa({"portLevelMtls": {str(v): {"mode": "STRICT"}}}), "portLevelMtls"),
        (lambda v: pod("web", labels={"istio.io/dataplane-mode": str(v)}), "dataplane-mode"),
        (lambda v: pod("web", labels={str(v): 1}), "must be strings"),
        (lambda v: pod(str(v), labels={"istio.io/dataplane-mode": "x"}), "Pod demo/[["),
    ],
)
def test_errors_quote_at_most_a_bounded_part_of_a_value(make: Any, fragment: str) -> None:
    big = alias_bomb(6)  # a million items: megabytes as repr, longer as str
    with pytest.raises(ConfigError) as info:
        run(ns("demo"), make(big))
    message = str(info.value)
    assert fragment in message
    assert len(message) < 700, message[:1000]


def test_warning_quotes_at_most_a_bounded_part_of_a_named_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = str(alias_bomb(6))
    out = run(service("web", {}, [{"port": 80, "targetPort": name}]))
    assert list(out["service/demo/web"].service.ports) == []
    assert f"…({len(name)} chars); the service has no endpoints" in caplog.text
    assert len(caplog.text) < 700


@pytest.mark.parametrize("port", ["²", "1" * 5000, "٨٠"])
def test_odd_digit_strings_are_not_port_numbers(port: str) -> None:
    with pytest.raises(ConfigError, match="is not a port number"):
        run(service("web", {}, [{"port": port}]))
    with pytest.raises(ConfigError, match="is not a port number"):
        run(selected_pa({"portLevelMtls": {port: {"mode": "STRICT"}}}))


def test_container_port_name_must_be_a_string() -> None:
    bad = pod("web", spec={"containers": [{"ports": [{"name": ["x"], "containerPort": 80}]}]})
    with pytest.raises(ConfigError, match=r"ports\[0\]\.name: must be a string, got a list"):
        run(bad)


# --- address conflicts: one owner per address, the one in force keeps it ----------------

SVC_A = service("a", {}, [{"port": 80}], clusterIP="10.96.0.10")
SVC_B = service("b", {}, [{"port": 80}], clusterIP="10.96.0.10")


def sourced(*objects: tuple[str, dict[str, Any]]) -> list[SourcedObject]:
    return [SourcedObject(obj, source) for source, obj in objects]


@pytest.mark.parametrize("b_first", [False, True])
def test_second_service_on_a_vip_in_force_is_the_error(b_first: bool) -> None:
    in_force = translate(sourced(("a.yaml#1", SVC_A)))
    update = [("a.yaml#1", SVC_A), ("b.yaml#1", SVC_B)]
    with pytest.raises(ConfigError) as info:
        translate(sourced(*(reversed(update) if b_first else update)), in_force=in_force)
    assert str(info.value) == (
        "b.yaml#1: Service demo/b: spec.clusterIP: 10.96.0.10 already belongs to Service "
        "demo/a (a.yaml#1) in the configuration in force, which keeps it; give Service demo/b "
        "an address of its own"
    )


def test_new_claimants_of_one_address_are_both_named() -> None:
    with pytest.raises(ConfigError) as info:
        translate(sourced(("a.yaml#1", SVC_A), ("b.yaml#1", SVC_B)))
    assert str(info.value).startswith(
        "b.yaml#1: Service demo/b: spec.clusterIP: 10.96.0.10 is also claimed by Service "
        "demo/a (a.yaml#1)"
    )


def test_an_address_can_move_between_objects_in_one_update() -> None:
    in_force = translate(sourced(("a.yaml#1", SVC_A)))
    moved = service("a", {}, [{"port": 80}], clusterIP="10.96.0.11")
    out = translate(sourced(("a.yaml#1", moved), ("b.yaml#1", SVC_B)), in_force=in_force)
    assert list(out["service/demo/b"].service.addresses) == ["10.96.0.10"]


@pytest.mark.parametrize(
    ("newcomer", "fragment"),
    [
        (pod("web-2", ip="10.0.0.5", metadata={"uid": "u2"}), "Pod demo/web-2: status.podIP"),
        (
            pod(
                "web-2", ip="10.0.0.9", status={"podIPs": [{"ip": "10.0.0.9"}, {"ip": "10.0.0.5"}]}
            ),
            "Pod demo/web-2: status.podIP: 10.0.0.5",
        ),
        (service("web", {}, [{"port": 80}], clusterIP="10.0.0.5"), "Service demo/web"),
        (
            pod("web-2", ip="10.0.0.5", spec={"hostNetwork": True}, metadata={"uid": "u2"}),
            "Pod demo/web-2",
        ),
    ],
)
def test_pod_ip_conflicts(newcomer: dict[str, Any], fragment: str) -> None:
    first = pod("web-1", ip="10.0.0.5", metadata={"uid": "u1"})
    in_force = translate(sourced(("a.yaml#1", first)))
    with pytest.raises(ConfigError) as info:
        translate(sourced(("b.yaml#1", newcomer), ("a.yaml#1", first)), in_force=in_force)
    assert str(info.value).startswith(f"b.yaml#1: {fragment}")
    assert "already belongs to Pod demo/web-1 (a.yaml#1)" in str(info.value)


def test_host_network_pods_share_their_node_ip() -> None:
    host = {"hostNetwork": True}
    out = run(
        pod("agent-1", ip="192.168.1.10", metadata={"uid": "u1"}, spec=host),
        pod("exporter-1", ip="192.168.1.10", metadata={"uid": "u2"}, spec=host),
    )
    assert list(workload(out, "agent-1").addresses) == list(workload(out, "exporter-1").addresses)
