"""ambimesh.lab.topology: the lab's plan from the bundled YAML and from small inline
documents, with a deterministic UID factory. Pure: no namespaces are created."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ambimesh.lab
from ambimesh.lab.topology import (
    CONTROLLER_PORT,
    MAX_NODES,
    MAX_PODS_PER_NODE,
    SCALE_FILE,
    SCALE_NAMESPACE,
    Document,
    LabPlan,
    NodePlan,
    PlanError,
    PodPlan,
    ServicePlan,
    documents_of,
    plan,
    scale_documents,
)

CONFIG_DIR = Path(ambimesh.lab.__file__).parent / "config"
LAB = "lab"


def uid_factory() -> Callable[[], str]:
    counter: Iterator[int] = iter(range(1, 10_000))
    return lambda: f"00000000-0000-0000-0000-{next(counter):012d}"


def uid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


def bundled() -> dict[str, list[Document]]:
    files = sorted(p for p in CONFIG_DIR.iterdir() if p.suffix in (".yaml", ".yml"))
    return documents_of((p.name, p.read_text()) for p in files)


@pytest.fixture
def bundled_docs() -> dict[str, list[Document]]:
    return bundled()


@pytest.fixture
def lab_plan(bundled_docs: dict[str, list[Document]]) -> LabPlan:
    return plan(LAB, bundled_docs, uid_factory())


def node_doc(name: str) -> Document:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def pod_doc(
    name: str,
    namespace: str | None = "demo",
    node: Any = "node-1",
    command: Any = ("sleep", "infinity"),
) -> Document:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    container: dict[str, Any] = {"name": "c"}
    if command is not None:
        container["command"] = list(command) if isinstance(command, tuple) else command
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": node, "containers": [container]},
    }


def service_doc(name: str, namespace: str = "demo", **spec: Any) -> Document:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"ports": [{"port": 80}], **spec},
    }


# --- the bundled lab -------------------------------------------------------------------


def test_bundled_lab_layout(lab_plan: LabPlan) -> None:
    assert lab_plan.lab == LAB
    assert lab_plan.fabric_netns == "lab-fabric"
    assert lab_plan.controller_address == "198.18.0.1"
    assert lab_plan.controller_target == f"198.18.0.1:{CONTROLLER_PORT}"
    assert CONTROLLER_PORT == 15012


def test_bundled_nodes(lab_plan: LabPlan) -> None:
    assert lab_plan.nodes == (
        NodePlan("node-1", "lab-node-1", "198.18.0.11", "198.19.1.0/24", "198.19.1.1", "fab1"),
        NodePlan("node-2", "lab-node-2", "198.18.0.12", "198.19.2.0/24", "198.19.2.1", "fab2"),
    )
    assert lab_plan.node("node-2").pod_cidr == "198.19.2.0/24"
    with pytest.raises(KeyError):
        lab_plan.node("node-3")


def test_bundled_pods(lab_plan: LabPlan) -> None:
    assert lab_plan.pods == (
        PodPlan(
            name="client",
            namespace="demo",
            uid=uid(1),
            node="node-1",
            netns="lab-demo.client",
            address="198.19.1.10",
            host_veth="vpde10",
            commands=(("sleep", "infinity"),),
            ports=(),
            service_account="client",
        ),
        PodPlan(
            name="server",
            namespace="demo",
            uid=uid(2),
            node="node-2",
            netns="lab-demo.server",
            address="198.19.2.10",
            host_veth="vpde20",
            commands=(("python", "-m", "ambimesh.lab.demo_app", "--port", "8080"),),
            ports=(8080,),
            service_account="server",
        ),
        PodPlan(
            name="legacy-client",
            namespace="legacy",
            uid=uid(3),
            node="node-1",
            netns="lab-legacy.legacy-client",
            address="198.19.1.11",
            host_veth="vpde11",
            commands=(("sleep", "infinity"),),
            ports=(),
        ),
        PodPlan(
            name="client-2",
            namespace="demo",
            uid=uid(4),
            node="node-2",
            netns="lab-demo.client-2",
            address="198.19.2.11",
            host_veth="vpde21",
            commands=(("sleep", "infinity"),),
            ports=(),
            service_account="client",
        ),
        PodPlan(
            name="server-v2",
            namespace="demo",
            uid=uid(5),
            node="node-1",
            netns="lab-demo.server-v2",
            address="198.19.1.12",
            host_veth="vpde12",
            commands=(("python", "-m", "ambimesh.lab.demo_app", "--port", "8080"),),
            ports=(8080,),
            service_account="server",
        ),
        PodPlan(
            name="waypoint",
            namespace="demo",
            uid=uid(6),
            node="node-2",
            netns="lab-demo.waypoint",
            address="198.19.2.12",
            host_veth="vpde22",
            commands=(),
            ports=(),
            service_account="waypoint",
            waypoint="waypoint",
            waypoint_args=("--request-headers-timeout", "10"),
        ),
    )


def test_pod_addresses_lie_in_their_node_cidr_and_are_unique(lab_plan: LabPlan) -> None:
    import ipaddress

    for pod in lab_plan.pods:
        node = lab_plan.node(pod.node)
        assert ipaddress.IPv4Address(pod.address) in ipaddress.IPv4Network(node.pod_cidr)
        assert pod.address != node.gateway
    assert len({p.address for p in lab_plan.pods}) == len(lab_plan.pods)
    assert len({p.netns for p in lab_plan.pods}) == len(lab_plan.pods)
    assert len({p.uid for p in lab_plan.pods}) == len(lab_plan.pods)


def test_bundled_services(lab_plan: LabPlan) -> None:
    assert lab_plan.services == (
        ServicePlan("server", "demo", "198.18.128.10", ((80, 8080), (9090, 9090))),
    )


def test_runtime_documents_carry_pod_status_uid_and_cluster_ip(lab_plan: LabPlan) -> None:
    runtime = lab_plan.runtime_documents
    assert sorted(runtime) == sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    pods = {
        d["metadata"]["name"]: d
        for name in ("pods.yaml", "waypoint-canary.yaml")
        for d in runtime[name]
        if d["kind"] == "Pod"
    }
    assert set(pods) == {"client", "server", "legacy-client", "client-2", "server-v2", "waypoint"}
    for planned in lab_plan.pods:
        doc = pods[planned.name]
        assert doc["metadata"]["uid"] == planned.uid
        assert doc["metadata"]["namespace"] == planned.namespace
        assert doc["status"]["podIP"] == planned.address
        assert doc["status"]["podIPs"] == [{"ip": planned.address}]
        assert doc["status"]["hostIP"] == lab_plan.node(planned.node).address
    (svc,) = runtime["services.yaml"]
    assert svc["spec"]["clusterIP"] == "198.18.128.10"
    # Objects the plan does not lay out are carried over as they were.
    assert runtime["peer-authentication.yaml"] == bundled()["peer-authentication.yaml"]
    assert runtime["namespaces.yaml"] == bundled()["namespaces.yaml"]


def test_plan_does_not_mutate_its_input(bundled_docs: dict[str, list[Document]]) -> None:
    before = copy.deepcopy(bundled_docs)
    result = plan(LAB, bundled_docs, uid_factory())
    assert bundled_docs == before
    for docs in bundled_docs.values():
        for doc in docs:
            assert "status" not in doc
            assert "uid" not in doc.get("metadata", {})
    # ... and the runtime copy shares no mutable object with it.
    result.runtime_documents["pods.yaml"][0]["metadata"]["name"] = "changed"
    assert bundled_docs == before


def test_plan_is_deterministic_for_a_deterministic_uid_factory(
    bundled_docs: dict[str, list[Document]],
) -> None:
    assert plan(LAB, bundled_docs, uid_factory()) == plan(LAB, bundled_docs, uid_factory())


def test_lab_name_prefixes_every_namespace(bundled_docs: dict[str, list[Document]]) -> None:
    other = plan("x9", bundled_docs, uid_factory())
    assert other.fabric_netns == "x9-fabric"
    assert [n.netns for n in other.nodes] == ["x9-node-1", "x9-node-2"]
    assert [p.netns for p in other.pods] == [
        "x9-demo.client",
        "x9-demo.server",
        "x9-legacy.legacy-client",
        "x9-demo.client-2",
        "x9-demo.server-v2",
        "x9-demo.waypoint",
    ]


# --- hosts_file ------------------------------------------------------------------------


def test_hosts_file_same_namespace_gets_the_short_name(lab_plan: LabPlan) -> None:
    assert lab_plan.hosts_file(lab_plan.pod("demo/client")) == (
        "127.0.0.1 localhost\n"
        "198.19.1.10 client\n"
        "198.18.128.10 server server.demo server.demo.svc server.demo.svc.cluster.local\n"
    )


def test_hosts_file_other_namespace_gets_qualified_names_only(lab_plan: LabPlan) -> None:
    assert lab_plan.hosts_file(lab_plan.pod("legacy/legacy-client")) == (
        "127.0.0.1 localhost\n"
        "198.19.1.11 legacy-client\n"
        "198.18.128.10 server.demo server.demo.svc server.demo.svc.cluster.local\n"
    )


# --- LabPlan.pod() ---------------------------------------------------------------------


@pytest.fixture
def ambiguous_plan() -> LabPlan:
    docs = {
        "nodes.yaml": [node_doc("node-1")],
        "pods.yaml": [
            pod_doc("client", "demo"),
            pod_doc("client", "legacy"),
            pod_doc("server", "demo"),
        ],
    }
    return plan(LAB, docs, uid_factory())


@pytest.mark.parametrize(
    ("ref", "namespace", "name"),
    [
        ("demo/client", "demo", "client"),
        ("legacy/client", "legacy", "client"),
        ("demo/server", "demo", "server"),
        ("server", "demo", "server"),
    ],
)
def test_pod_lookup(ambiguous_plan: LabPlan, ref: str, namespace: str, name: str) -> None:
    pod = ambiguous_plan.pod(ref)
    assert (pod.namespace, pod.name) == (namespace, name)
    assert pod.ref == f"{namespace}/{name}"


@pytest.mark.parametrize(
    ("ref", "why"),
    [
        ("client", "'client' is ambiguous"),
        ("nobody", "'nobody' is not a pod of this lab"),
        ("demo/nobody", "'demo/nobody' is not a pod of this lab"),
        ("other/client", "'other/client' is not a pod of this lab"),
        ("", "'' is not a pod of this lab"),
    ],
)
def test_pod_lookup_errors(ambiguous_plan: LabPlan, ref: str, why: str) -> None:
    with pytest.raises(KeyError) as info:
        ambiguous_plan.pod(ref)
    message = info.value.args[0]
    assert message == f"{why}; pods: demo/client, legacy/client, demo/server"


# --- smaller inline labs ---------------------------------------------------------------


def test_pod_without_namespace_goes_to_default_and_keeps_a_given_uid() -> None:
    given = pod_doc("p", namespace=None)
    given["metadata"]["uid"] = "given-uid"
    docs = {"a.yaml": [node_doc("node-1"), given, pod_doc("q", namespace=None)]}
    result = plan(LAB, docs, uid_factory())
    p, q = result.pods
    assert (p.namespace, p.uid, p.netns) == ("default", "given-uid", "lab-default.p")
    assert q.namespace == "default"
    assert q.uid.startswith("00000000-")
    runtime_pod = result.runtime_documents["a.yaml"][1]
    assert runtime_pod["metadata"] == {"name": "p", "namespace": "default", "uid": "given-uid"}


def test_pods_are_numbered_per_node() -> None:
    docs = {
        "a.yaml": [node_doc("n-a"), node_doc("n-b"), node_doc("n-c")],
        "b.yaml": [
            pod_doc("p1", node="n-b"),
            pod_doc("p2", node="n-a"),
            pod_doc("p3", node="n-b"),
            pod_doc("p4", node="n-c"),
            pod_doc("p5", node="n-b"),
        ],
    }
    result = plan(LAB, docs, uid_factory())
    assert [(p.name, p.node, p.address) for p in result.pods] == [
        ("p1", "n-b", "198.19.2.10"),
        ("p2", "n-a", "198.19.1.10"),
        ("p3", "n-b", "198.19.2.11"),
        ("p4", "n-c", "198.19.3.10"),
        ("p5", "n-b", "198.19.2.12"),
    ]
    assert [n.address for n in result.nodes] == ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
    assert [n.fabric_veth for n in result.nodes] == ["fab1", "fab2", "fab3"]


def test_command_and_args_are_joined_and_ports_collected() -> None:
    pod = pod_doc("p", command=("python", "-m", "app"))
    pod["spec"]["containers"][0]["args"] = ["--port", "9000"]
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 9000}, {"name": "noport"}]
    pod["spec"]["containers"].append(
        {"name": "side", "args": ["sleep", "1"], "ports": [{"containerPort": 9001}]}
    )
    (planned,) = plan(LAB, {"a.yaml": [node_doc("node-1"), pod]}, uid_factory()).pods
    assert planned.commands == (("python", "-m", "app", "--port", "9000"), ("sleep", "1"))
    assert planned.ports == (9000, 9001)


def test_a_waypoint_pod_runs_the_waypoint_not_its_containers() -> None:
    pod = pod_doc("wp", command=None)  # an image-only container, as Istio deploys it
    pod["metadata"]["labels"] = {"gateway.networking.k8s.io/gateway-name": "waypoint"}
    pod["spec"]["serviceAccountName"] = "waypoint"
    other = pod_doc("app")
    planned = plan(LAB, {"a.yaml": [node_doc("node-1"), pod, other]}, uid_factory()).pods
    assert (planned[0].waypoint, planned[0].service_account, planned[0].commands) == (
        "waypoint",
        "waypoint",
        (),
    )
    assert (planned[1].waypoint, planned[1].service_account) == ("", "default")


def test_services_get_vips_in_order_and_keep_a_given_cluster_ip() -> None:
    docs = {
        "a.yaml": [
            node_doc("node-1"),
            service_doc("one"),
            service_doc("two", clusterIP="10.0.0.7"),
            service_doc("three", ports=[{"port": 443, "targetPort": "https"}]),
            service_doc("four", ports=[{"port": 80, "targetPort": 8080}, {"port": 81}]),
        ]
    }
    result = plan(LAB, docs, uid_factory())
    assert result.services == (
        ServicePlan("one", "demo", "198.18.128.10", ((80, 80),)),
        ServicePlan("two", "demo", "10.0.0.7", ((80, 80),)),
        ServicePlan("three", "demo", "198.18.128.12", ((443, 443),)),
        ServicePlan("four", "demo", "198.18.128.13", ((80, 8080), (81, 81))),
    )
    ips = [d["spec"]["clusterIP"] for d in result.runtime_documents["a.yaml"][1:]]
    assert ips == ["198.18.128.10", "10.0.0.7", "198.18.128.12", "198.18.128.13"]


# --- errors ----------------------------------------------------------------------------


def test_no_node_objects() -> None:
    with pytest.raises(PlanError, match="at least one Node"):
        plan(LAB, {"pods.yaml": [pod_doc("p")]}, uid_factory())
    with pytest.raises(PlanError, match="at least one Node"):
        plan(LAB, {}, uid_factory())


@pytest.mark.parametrize("node", ["node-9", None, 3, ""])
def test_pod_on_unknown_node(node: Any) -> None:
    docs = {"pods.yaml": [node_doc("node-1"), node_doc("node-2"), pod_doc("p", node=node)]}
    with pytest.raises(PlanError) as info:
        plan(LAB, docs, uid_factory())
    message = str(info.value)
    assert message.startswith("pods.yaml: Pod demo/p: spec.nodeName ")
    assert repr(node) in message
    assert "(node-1, node-2)" in message


@pytest.mark.parametrize(
    "doc",
    [
        {"kind": "Node", "metadata": {}},
        {"kind": "Node"},
        {"kind": "Node", "metadata": {"name": ""}},
        {"kind": "Node", "metadata": {"name": 7}},
        {"kind": "Pod", "metadata": {"namespace": "demo"}, "spec": {"nodeName": "node-1"}},
        {"kind": "Service", "metadata": {"namespace": "demo"}, "spec": {}},
    ],
)
def test_missing_metadata_name(doc: Document) -> None:
    with pytest.raises(PlanError, match=r"^x\.yaml: .*metadata\.name is missing"):
        plan(LAB, {"x.yaml": [node_doc("node-1"), doc]}, uid_factory())


@pytest.mark.parametrize(
    "command",
    [
        [1],
        ["sleep", 3],
        ["sleep", None],
        [],
        None,
    ],
)
def test_command_must_be_a_list_of_strings(command: Any) -> None:
    docs = {"p.yaml": [node_doc("node-1"), pod_doc("p", command=command)]}
    with pytest.raises(
        PlanError, match=r"^p\.yaml: Pod demo/p: spec\.containers\[0\]\.command must be"
    ):
        plan(LAB, docs, uid_factory())


@pytest.mark.parametrize(
    "container",
    [
        {"command": "sleep infinity"},  # a string must not become one argv entry per char
        {"command": ["sleep"], "args": "infinity"},
        {"args": "sleep infinity"},
        {"command": {"sleep": "infinity"}},
    ],
)
def test_command_and_args_must_be_lists(container: dict[str, Any]) -> None:
    pod = pod_doc("p", command=None)
    pod["spec"]["containers"] = [{"name": "c", **container}]
    with pytest.raises(PlanError, match="command must be a list of strings"):
        plan(LAB, {"p.yaml": [node_doc("node-1"), pod]}, uid_factory())


def test_service_port_must_be_a_number() -> None:
    docs = {"s.yaml": [node_doc("node-1"), service_doc("s", ports=[{"port": "http"}])]}
    with pytest.raises(PlanError, match=r"^s\.yaml: Service demo/s: spec\.ports\[0\]\.port"):
        plan(LAB, docs, uid_factory())


def test_distinct_pods_get_distinct_netns() -> None:
    docs = {"p.yaml": [node_doc("node-1"), pod_doc("y", "demo-x"), pod_doc("x-y", "demo")]}
    result = plan(LAB, docs, uid_factory())
    names = [p.netns for p in result.pods] + [n.netns for n in result.nodes]
    names.append(result.fabric_netns)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name", ["fabric", "node.1", "a.b"])
def test_node_names_that_could_collide_with_other_netns_are_rejected(name: str) -> None:
    with pytest.raises(PlanError, match=r"^n\.yaml: Node .*without dots and other than 'fabric'"):
        plan(LAB, {"n.yaml": [node_doc("node-1"), node_doc(name)]}, uid_factory())


def test_at_most_max_nodes() -> None:
    docs = {"n.yaml": [node_doc(f"n{i}") for i in range(MAX_NODES)]}
    assert len(plan(LAB, docs, uid_factory()).nodes) == MAX_NODES
    docs["n.yaml"].append(node_doc("one-too-many"))
    with pytest.raises(PlanError, match=f"up to {MAX_NODES} nodes"):
        plan(LAB, docs, uid_factory())


@pytest.mark.parametrize(
    "text",
    [
        "kind: Node\nmetadata: {name: [\n",
        "a: b\n  c: d\n",
        "kind: Node\n\tmetadata: x\n",
    ],
)
def test_invalid_yaml_names_the_file(text: str) -> None:
    with pytest.raises(PlanError, match=r"^broken\.yaml: not valid YAML"):
        documents_of([("good.yaml", "kind: Node\nmetadata: {name: n}\n"), ("broken.yaml", text)])


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "---\n42\n"])
def test_non_mapping_document_names_the_file(text: str) -> None:
    with pytest.raises(PlanError, match=r"^list\.yaml: every document must be a mapping"):
        documents_of([("list.yaml", text)])


def test_documents_of_skips_empty_documents_and_keeps_order() -> None:
    out = documents_of(
        [
            ("b.yaml", "---\nkind: Node\nmetadata: {name: n1}\n---\n---\nkind: Node\n"),
            ("a.yaml", ""),
        ]
    )
    assert list(out) == ["b.yaml", "a.yaml"]
    assert out["b.yaml"] == [{"kind": "Node", "metadata": {"name": "n1"}}, {"kind": "Node"}]
    assert out["a.yaml"] == []


def test_a_full_node_is_a_plan_error() -> None:
    pods = [pod_doc(f"p{i}") for i in range(MAX_PODS_PER_NODE + 1)]
    docs = {"p.yaml": [node_doc("node-1"), *pods]}
    with pytest.raises(PlanError, match=f"already has {MAX_PODS_PER_NODE} pods"):
        plan(LAB, docs, uid_factory())
    assert len(plan(LAB, {"p.yaml": docs["p.yaml"][:-1]}, uid_factory()).pods) == MAX_PODS_PER_NODE


# --- scale pods (ambimesh lab up --scale-pods N) ----------------------------------------


def scaled(count: int) -> LabPlan:
    docs = bundled()
    docs[SCALE_FILE] = scale_documents(docs, count)
    return plan(LAB, docs, uid_factory())


def test_scale_pods_are_enrolled_spread_over_nodes_and_share_identities() -> None:
    lab_plan = scaled(100)
    pods = [p for p in lab_plan.pods if p.namespace == SCALE_NAMESPACE]
    assert [p.name for p in pods] == [f"pod-{i:03d}" for i in range(100)]
    assert [p.node for p in pods[:4]] == ["node-1", "node-2", "node-1", "node-2"]
    assert sum(p.node == "node-1" for p in pods) == 50
    assert all(p.commands == () and p.ports == () for p in pods)  # the pause process only
    assert {p.service_account for p in pods} == {f"sa-{i:03d}" for i in range(0, 100, 10)}
    assert pods[9].service_account == "sa-000" and pods[10].service_account == "sa-010"
    # the bundled pods keep their places (addresses, veths) ahead of the scale pods
    base = plan(LAB, bundled(), uid_factory()).pods
    assert lab_plan.pods[: len(base)] == base
    assert len({p.address for p in lab_plan.pods}) == len(lab_plan.pods)
    assert len({p.host_veth for p in lab_plan.pods}) == len(lab_plan.pods)
    assert max(len(p.host_veth) for p in lab_plan.pods) <= 15  # IFNAMSIZ - 1
    namespace = next(d for d in lab_plan.runtime_documents[SCALE_FILE] if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"] == {"ambimesh.io/dataplane-mode": "ambient"}


def test_scale_pods_zero_adds_nothing_and_the_node_limit_holds() -> None:
    assert scale_documents(bundled(), 0) == []
    # the bundled lab has 3 pods on node-1 already; 2 x 240 scale pods put 243 there
    with pytest.raises(PlanError, match=f"already has {MAX_PODS_PER_NODE} pods"):
        scaled(2 * MAX_PODS_PER_NODE)
    with pytest.raises(PlanError, match="not a pod count"):
        scale_documents(bundled(), -1)
    with pytest.raises(PlanError, match="at least one Node"):
        scale_documents({"x.yaml": []}, 1)


def test_scale_pod_names_widen_past_a_thousand() -> None:
    docs = scale_documents({"n.yaml": [node_doc(f"n{i}") for i in range(5)]}, 1001)
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "Pod"]
    assert names[0] == "pod-0000" and names[-1] == "pod-1000"
