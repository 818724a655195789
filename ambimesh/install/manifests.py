"""The Kubernetes objects of an ambimesh install, built from the install values.

This is the one place the manifests are written: ``ambimesh install --dry-run`` renders
these objects with the user's values, and the Helm chart's templates are these same
objects rendered with placeholders instead of values (``ambimesh.install.chart``). So a
builder here only *places* values (``v["node"]["drainSeconds"]``, or inside an f-string);
it never computes with or branches on them, or the chart would not say the same thing.
An object shown only for some values names that value in ``Manifest.when``.

Why each privilege of the node pod is there is written beside it and in docs/install.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]
Values = Mapping[str, Any]

PART_OF = {"app.kubernetes.io/part-of": "ambimesh"}
CONTROLLER = "ambimesh-controller"
NODE = "ambimesh-node"
CONTROLLER_PORT = 15012
CONTROLLER_METRICS_PORT = 15016
AGENT_METRICS_PORT = 15014
ZTUNNEL_METRICS_PORT = 15020
READINESS_PORT = 15021
# Host paths, shared by every pod generation on a node (see the DaemonSet).
RUN_DIR = "/var/run/ambimesh"
TOKEN_DIR = "/var/run/secrets/ambimesh"
ROOT_CERT_DIR = "/etc/ambimesh/root"
# The controller runs as this non-root user (created in the image).
CONTROLLER_UID = 10001


@dataclass(frozen=True)
class Manifest:
    """One object and where it goes: a chart template file (or ``crds/`` when ``crd``).

    ``when``: the value path that must be true for the object to be rendered.
    ``chart``: False for what Helm does itself (the release namespace).
    """

    file: str
    obj: Obj
    when: str | None = None
    chart: bool = True
    crd: bool = False


def build(v: Values, namespace: str) -> list[Manifest]:
    """Every object, in the order ``kubectl apply`` needs them (namespace and CRDs first)."""
    return [
        Manifest("namespace.yaml", _namespace(namespace), chart=False),
        Manifest("ratelimits.ambimesh.io.yaml", _ratelimit_crd(), crd=True),
        Manifest("controller-serviceaccount.yaml", _service_account(CONTROLLER, namespace)),
        Manifest("controller-clusterrole.yaml", _controller_cluster_role()),
        Manifest("controller-clusterrolebinding.yaml", _controller_binding(namespace)),
        Manifest("controller-service.yaml", _controller_service(namespace)),
        Manifest("controller-deployment.yaml", _controller_deployment(v, namespace)),
        Manifest("node-serviceaccount.yaml", _service_account(NODE, namespace)),
        Manifest("node-daemonset.yaml", _node_daemonset(v, namespace)),
        Manifest("node-metrics-service.yaml", _node_metrics_service(namespace)),
        Manifest(
            "servicemonitor.yaml",
            _service_monitor(v, namespace, NODE, ["ztunnel-metrics", "agent-metrics"]),
            when="serviceMonitor.enabled",
        ),
        Manifest(
            "controller-servicemonitor.yaml",
            _service_monitor(v, namespace, CONTROLLER, ["http-monitoring"]),
            when="serviceMonitor.enabled",
        ),
    ]


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component, **PART_OF}


def _meta(name: str, namespace: str | None, component: str) -> Obj:
    meta: Obj = {"name": name, "labels": _labels(component)}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def _namespace(namespace: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}


def _ratelimit_crd() -> Obj:
    """ambimesh.io/v1alpha1 RateLimit (docs/waypoint.md); the controller validates the spec."""
    spec_schema = {
        "type": "object",
        "required": ["targetRef", "requests", "per"],
        "properties": {
            "targetRef": {
                "type": "object",
                "required": ["kind", "name"],
                "properties": {"kind": {"type": "string"}, "name": {"type": "string"}},
            },
            "requests": {"type": "integer", "minimum": 1},
            "per": {"type": "string"},
            "burst": {"type": "integer", "minimum": 1},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "ratelimits.ambimesh.io", "labels": dict(PART_OF)},
        "spec": {
            "group": "ambimesh.io",
            "scope": "Namespaced",
            "names": {
                "kind": "RateLimit",
                "listKind": "RateLimitList",
                "plural": "ratelimits",
                "singular": "ratelimit",
            },
            "versions": [
                {
                    "name": "v1alpha1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": spec_schema},
                        }
                    },
                }
            ],
        },
    }


def _service_account(name: str, namespace: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(name, namespace, name),
        # Only the controller's pod asks for the API token; nodes carry an audience-bound
        # token for the controller and none for the API server.
        "automountServiceAccountToken": False,
    }


# What the controller reads (its Kubernetes source and translation), read-only. Nothing
# here can change an object; tokenreviews/create is how it checks a node's token.
_READ = ["get", "list", "watch"]
CONTROLLER_RULES: list[Obj] = [
    {"apiGroups": [""], "resources": ["namespaces", "pods", "services", "nodes"], "verbs": _READ},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": _READ},
    {
        "apiGroups": ["security.istio.io"],
        "resources": ["peerauthentications", "authorizationpolicies"],
        "verbs": _READ,
    },
    {
        "apiGroups": ["networking.istio.io"],
        "resources": ["virtualservices", "destinationrules"],
        "verbs": _READ,
    },
    {
        "apiGroups": ["gateway.networking.k8s.io"],
        "resources": ["gateways", "httproutes"],
        "verbs": _READ,
    },
    {"apiGroups": ["ambimesh.io"], "resources": ["ratelimits"], "verbs": _READ},
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
]


def _controller_cluster_role() -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _meta(CONTROLLER, None, CONTROLLER),
        "rules": CONTROLLER_RULES,
    }


def _controller_binding(namespace: str) -> Obj:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _meta(CONTROLLER, None, CONTROLLER),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": CONTROLLER,
        },
        "subjects": [{"kind": "ServiceAccount", "name": CONTROLLER, "namespace": namespace}],
    }


def _controller_service(namespace: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(CONTROLLER, namespace, CONTROLLER),
        "spec": {
            "selector": _labels(CONTROLLER),
            "ports": [
                {
                    "name": "grpc",
                    "port": CONTROLLER_PORT,
                    "targetPort": CONTROLLER_PORT,
                    "appProtocol": "grpc",
                },
                {"name": "http-monitoring", "port": CONTROLLER_METRICS_PORT},
            ],
        },
    }


def controller_address(namespace: str) -> str:
    return f"{CONTROLLER}.{namespace}.svc:{CONTROLLER_PORT}"


def _image(v: Values) -> str:
    return f"{v['image']['repository']}:{v['image']['tag']}"


_RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "runAsUser": CONTROLLER_UID,
    "runAsGroup": CONTROLLER_UID,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}

# The controller's CA directory must be its own (mode 0700, key 0600) and writable, which a
# Secret volume is not: this copies the Secret into an emptyDir once per pod start, and
# writes an empty join-token file when no join-token Secret exists.
_PREPARE_STATE = (
    "set -eu; install -d -m 0700 /state/ca; "
    "install -m 0644 /ca/root-cert.pem /state/ca/root-cert.pem; "
    "install -m 0600 /ca/root-key.pem /state/ca/root-key.pem; "
    "if [ -f /tokens/tokens.yaml ]; then install -m 0600 /tokens/tokens.yaml /state/tokens.yaml; "
    "else : > /state/tokens.yaml; fi"
)


def _scrape_annotations(port: int) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def _controller_deployment(v: Values, namespace: str) -> Obj:
    hosts = f"{CONTROLLER},{CONTROLLER}.{namespace}.svc,{CONTROLLER}.{namespace}.svc.cluster.local"
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(CONTROLLER, namespace, CONTROLLER),
        "spec": {
            # One controller; Recreate so that two never push different versions at once.
            # Its outage does not touch traffic (ARCHITECTURE.md "Controller outages").
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _labels(CONTROLLER)},
            "template": {
                "metadata": {
                    "labels": _labels(CONTROLLER),
                    "annotations": _scrape_annotations(CONTROLLER_METRICS_PORT),
                },
                "spec": {
                    "serviceAccountName": CONTROLLER,
                    # The API token its Kubernetes source and TokenReviews use.
                    "automountServiceAccountToken": True,
                    "securityContext": {
                        "fsGroup": CONTROLLER_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "nodeSelector": v["controller"]["nodeSelector"],
                    "tolerations": v["controller"]["tolerations"],
                    "initContainers": [
                        {
                            "name": "prepare-state",
                            "image": _image(v),
                            "imagePullPolicy": v["image"]["pullPolicy"],
                            "command": ["sh", "-c", _PREPARE_STATE],
                            "securityContext": _RESTRICTED,
                            "volumeMounts": [
                                {"name": "ca", "mountPath": "/ca", "readOnly": True},
                                {"name": "join-tokens", "mountPath": "/tokens", "readOnly": True},
                                {"name": "state", "mountPath": "/state"},
                            ],
                        }
                    ],
                    "containers": [
                        {
                            "name": "controller",
                            "image": _image(v),
                            "imagePullPolicy": v["image"]["pullPolicy"],
                            "command": ["ambimesh-controller"],
                            "args": [
                                # Configuration from the Kubernetes API; nodes prove
                                # themselves with their projected token (TokenReview).
                                "--source=kubernetes",
                                f"--token-audience={v['node']['tokenAudience']}",
                                f"--node-service-accounts={namespace}/{NODE}",
                                "--state-dir=/var/lib/ambimesh/ca",
                                "--tokens=/var/lib/ambimesh/tokens.yaml",
                                f"--listen=0.0.0.0:{CONTROLLER_PORT}",
                                f"--metrics-listen=0.0.0.0:{CONTROLLER_METRICS_PORT}",
                                f"--serving-hosts={hosts}",
                                f"--trust-domain={v['trustDomain']}",
                                f"--log-level={v['logLevel']}",
                            ],
                            "ports": [
                                {"name": "grpc", "containerPort": CONTROLLER_PORT},
                                {
                                    "name": "http-monitoring",
                                    "containerPort": CONTROLLER_METRICS_PORT,
                                },
                            ],
                            "readinessProbe": {
                                "tcpSocket": {"port": CONTROLLER_PORT},
                                "periodSeconds": 5,
                            },
                            "resources": v["controller"]["resources"],
                            "securityContext": _RESTRICTED,
                            "volumeMounts": [
                                {"name": "state", "mountPath": "/var/lib/ambimesh"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "state", "emptyDir": {}},
                        {
                            "name": "ca",
                            "secret": {"secretName": v["caSecret"], "defaultMode": 0o440},
                        },
                        {
                            "name": "join-tokens",
                            "secret": {
                                "secretName": v["joinTokensSecret"],
                                "optional": True,
                                "defaultMode": 0o440,
                            },
                        },
                    ],
                },
            },
        },
    }


# Capabilities of the node containers: the fewest with which every kernel call they make
# passes, measured on Linux 6.18 by tests/integration/test_node_capabilities.py (which also
# shows each one is needed) and on Debian 12's 6.1 by make test-vagrant. Both run as uid 0
# without privileged: true.
AGENT_CAPABILITIES = [
    # bpf(): create maps, load programs, pin them and open pins by path, link sk_lookup to
    # a netns, read program and link info (a dead agent's programs are found through their
    # pins; by id, which 6.1 allows only with CAP_SYS_ADMIN, is the fallback).
    "BPF",
    # The "net admin" BPF types: CGROUP_SOCK_ADDR, SOCK_OPS and CGROUP_SOCKOPT programs and
    # the SOCKHASH map need CAP_NET_ADMIN (bpf_net_capable()), as does BPF_PROG_QUERY.
    "NET_ADMIN",
    # Opening /proc/<pid>/ns/net of pod processes owned by other users (ptrace access).
    "SYS_PTRACE",
]
ZTUNNEL_CAPABILITIES = [
    # setns(CLONE_NEWNET) into each pod's netns to open its listeners and upstream
    # sockets. (Its netns sysctl, tcp_migrate_req, needs only uid 0 there.)
    "SYS_ADMIN",
]


def _node_security(capabilities: list[str]) -> Obj:
    return {
        "privileged": False,
        # The API refuses false beside CAP_SYS_ADMIN (ztunnel); both run as uid 0 anyway.
        "allowPrivilegeEscalation": True,
        "readOnlyRootFilesystem": True,
        "runAsUser": 0,
        "runAsGroup": 0,
        "capabilities": {"drop": ["ALL"], "add": capabilities},
        # The runtime's default profile (containerd's, Docker's) allows bpf() to a process
        # holding CAP_BPF and setns() to one holding CAP_SYS_ADMIN: no Unconfined needed.
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _node_env() -> list[Obj]:
    return [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]


def _node_common_args(v: Values, namespace: str) -> list[str]:
    return [
        "--node=$(NODE_NAME)",
        f"--controller={controller_address(namespace)}",
        f"--root-cert={ROOT_CERT_DIR}/root-cert.pem",
        f"--token-file={TOKEN_DIR}/token",
        f"--log-level={v['logLevel']}",
    ]


def _node_daemonset(v: Values, namespace: str) -> Obj:
    agent = {
        "name": "agent",
        "image": _image(v),
        "imagePullPolicy": v["image"]["pullPolicy"],
        # One agent per node at a time: during a surge the new pod's agent waits here until
        # the old pod's agent has exited, while the new ztunnel is handed every pod by the
        # old agent through the shared socket (ARCHITECTURE.md "ztunnel handover").
        "command": ["flock", f"{RUN_DIR}/agent.lock", "with-kernel-headers", "ambimesh-agent"],
        "args": [
            *_node_common_args(v, namespace),
            f"--socket={RUN_DIR}/ztunnel.sock",
            f"--bpf-pin-dir={v['node']['bpfPinDir']}",
            f"--metrics-port={AGENT_METRICS_PORT}",
        ],
        "env": _node_env(),
        "ports": [{"name": "agent-metrics", "containerPort": AGENT_METRICS_PORT}],
        "resources": v["node"]["agentResources"],
        "securityContext": _node_security(AGENT_CAPABILITIES),
        "volumeMounts": [
            {"name": "run", "mountPath": RUN_DIR},
            {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
            {"name": "cgroup", "mountPath": "/sys/fs/cgroup", "readOnly": True},
            {"name": "netns", "mountPath": "/var/run/netns", "readOnly": True},
            {"name": "host-modules", "mountPath": "/host/lib/modules", "readOnly": True},
            {"name": "modules", "mountPath": "/lib/modules"},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "root-cert", "mountPath": ROOT_CERT_DIR, "readOnly": True},
            {"name": "node-token", "mountPath": TOKEN_DIR, "readOnly": True},
        ],
    }
    ztunnel = {
        "name": "ztunnel",
        "image": _image(v),
        "imagePullPolicy": v["image"]["pullPolicy"],
        "command": ["ambimesh-ztunnel"],
        "args": [
            *_node_common_args(v, namespace),
            f"--agent-socket={RUN_DIR}/ztunnel.sock",
            f"--trust-domain={v['trustDomain']}",
            f"--drain-seconds={v['node']['drainSeconds']}",
            f"--metrics-port={ZTUNNEL_METRICS_PORT}",
            f"--readiness-port={READINESS_PORT}",
        ],
        "env": _node_env(),
        "ports": [
            {"name": "ztunnel-metrics", "containerPort": ZTUNNEL_METRICS_PORT},
            {"name": "readiness", "containerPort": READINESS_PORT},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/healthz/ready", "port": READINESS_PORT},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": v["node"]["ztunnelResources"],
        "securityContext": _node_security(ZTUNNEL_CAPABILITIES),
        "volumeMounts": [
            {"name": "run", "mountPath": RUN_DIR},
            {"name": "root-cert", "mountPath": ROOT_CERT_DIR, "readOnly": True},
            {"name": "node-token", "mountPath": TOKEN_DIR, "readOnly": True},
        ],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": _meta(NODE, namespace, NODE),
        "spec": {
            "selector": {"matchLabels": _labels(NODE)},
            # Surge: the new pod's ztunnel takes over every pod before the old pod is
            # stopped, so capture never lapses; maxUnavailable 0 never leaves a node bare.
            "updateStrategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": _labels(NODE),
                    "annotations": _scrape_annotations(ZTUNNEL_METRICS_PORT),
                },
                "spec": {
                    "serviceAccountName": NODE,
                    "automountServiceAccountToken": False,
                    "priorityClassName": "system-node-critical",
                    # hostPID: the agent finds pods the kubelet way, from /proc/<pid>/cgroup
                    # and /proc/<pid>/ns/net of their processes. No hostNetwork: ztunnel's
                    # listeners are opened inside each pod's netns, its own ports need none.
                    "hostPID": True,
                    "hostNetwork": False,
                    # ztunnel drains established connections this long on SIGTERM.
                    "terminationGracePeriodSeconds": v["node"]["drainSeconds"],
                    "nodeSelector": v["node"]["nodeSelector"],
                    "tolerations": v["node"]["tolerations"],
                    "containers": [agent, ztunnel],
                    "volumes": _node_volumes(v),
                },
            },
        },
    }


def _host(name: str, path: str, kind: str) -> Obj:
    return {"name": name, "hostPath": {"path": path, "type": kind}}


def _node_volumes(v: Values) -> list[Obj]:
    token = {
        "serviceAccountToken": {
            "audience": v["node"]["tokenAudience"],
            "expirationSeconds": v["node"]["tokenExpirationSeconds"],
            "path": "token",
        }
    }
    return [
        # A host directory, not an emptyDir: old and new pods of a rolling update meet at
        # the one agent socket (and the agent lock) there.
        _host("run", RUN_DIR, "DirectoryOrCreate"),
        # Pins must outlive the pod (capture stays in force across agent restarts).
        _host("bpffs", "/sys/fs/bpf", "Directory"),
        _host("cgroup", "/sys/fs/cgroup", "Directory"),
        _host("netns", "/var/run/netns", "DirectoryOrCreate"),
        # bcc's kernel headers: the host's when it has them, else the image's Debian ones;
        # with-kernel-headers links the right ones into the writable /lib/modules.
        _host("host-modules", "/lib/modules", "Directory"),
        {"name": "modules", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "root-cert", "configMap": {"name": v["rootCertConfigMap"]}},
        {"name": "node-token", "projected": {"sources": [token]}},
    ]


def _node_metrics_service(namespace: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(f"{NODE}-metrics", namespace, NODE),
        "spec": {
            "clusterIP": "None",
            "selector": _labels(NODE),
            "ports": [
                {"name": "ztunnel-metrics", "port": ZTUNNEL_METRICS_PORT},
                {"name": "agent-metrics", "port": AGENT_METRICS_PORT},
            ],
        },
    }


def _service_monitor(v: Values, namespace: str, component: str, ports: list[str]) -> Obj:
    """Scrapes ``ports`` (names) of the Service labelled for ``component``."""
    interval = v["serviceMonitor"]["interval"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(component, namespace, component),
        "spec": {
            "selector": {"matchLabels": _labels(component)},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [
                {"port": port, "path": "/metrics", "interval": interval} for port in ports
            ],
        },
    }
