"""The local lab: a small cluster on one machine, out of network namespaces and cgroups.

`up` always sweeps what an earlier lab of the same name left (so it recovers from a
crash), then builds the fabric, nodes and pods, starts the controller in the fabric
namespace and one agent + ztunnel per node, and waits until every node is ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from importlib import resources
from pathlib import Path
from subprocess import CompletedProcess, Popen

import yaml

from ambimesh.lab import cgroups, network, procs
from ambimesh.lab.netclient import connect_in, http_get
from ambimesh.lab.topology import (
    CONTROLLER_PORT,
    SCALE_FILE,
    LabPlan,
    NodePlan,
    PodPlan,
    ServicePlan,
    documents_of,
    plan,
    scale_documents,
)
from mesh.cgroups import cgroup2_mount

log = logging.getLogger(__name__)

DEFAULT_LAB = "amb"
STATE_ROOT = Path(os.environ.get("AMBIMESH_STATE_ROOT", "/run/ambimesh"))
BPF_PIN_ROOT = Path("/sys/fs/bpf/ambimesh-lab")
COMPONENTS = ("agent", "ztunnel")
READINESS_PORT = 15021
METRICS_PORT = 15020
AGENT_METRICS_PORT = 15014
CONTROLLER_METRICS_PORT = 15016
AGENT_READY = (
    "ambimesh_config_synced 1.0",
    "ambimesh_ztunnel_connected 1.0",
    "ambimesh_pending_pods 0.0",
)


class LabError(RuntimeError):
    """The lab cannot be built or used; the message says what to do."""


def bundled_config_dir() -> Path:
    return Path(str(resources.files("ambimesh.lab") / "config"))


def examples_dir() -> Path:
    """Extra configurations the lab can add: examples/<name>.yaml."""
    return Path(str(resources.files("ambimesh.lab") / "examples"))


def example_names() -> list[str]:
    return sorted(p.stem for p in examples_dir().glob("*.yaml"))


def example_file(name: str) -> Path:
    if name not in example_names():
        raise LabError(f"no lab example {name!r}; there are: {', '.join(example_names())}")
    return examples_dir() / f"{name}.yaml"


class Lab:
    def __init__(
        self,
        name: str = DEFAULT_LAB,
        state_root: Path = STATE_ROOT,
        cert_ttl: int | None = None,
        ztunnel_workers: int | None = None,
        same_node_fast_path: bool | None = None,
    ) -> None:
        """``cert_ttl`` (default: $AMBIMESH_LAB_CERT_TTL, else ztunnel's 24 h): the workload
        certificate lifetime of the ztunnels this object starts; short ones let tests see
        renewals. ``ztunnel_workers`` (default: $AMBIMESH_LAB_ZTUNNEL_WORKERS, else 1): each
        node's ztunnel ``--workers``; one, because the lab's nodes share one machine's few
        cores, unless a test or the benchmark asks for more. ``same_node_fast_path``
        (default: $AMBIMESH_LAB_SAME_NODE_FAST_PATH=1, else ztunnel's default, off): pass
        ``--same-node-fast-path`` to every ztunnel."""
        if not (name.isascii() and name.isalnum()) or len(name) > 12:
            # No dashes: `down` sweeps namespaces named "<lab>-*", which must not reach another lab.
            raise LabError(f"lab name {name!r}: use up to 12 letters or digits")
        self.name = name
        self.state = state_root / name
        env_ttl = os.environ.get("AMBIMESH_LAB_CERT_TTL")
        self.cert_ttl = cert_ttl or (int(env_ttl) if env_ttl else None)
        env_workers = os.environ.get("AMBIMESH_LAB_ZTUNNEL_WORKERS")
        self.ztunnel_workers = ztunnel_workers or (int(env_workers) if env_workers else 1)
        if same_node_fast_path is None:
            same_node_fast_path = os.environ.get("AMBIMESH_LAB_SAME_NODE_FAST_PATH") == "1"
        self.same_node_fast_path = same_node_fast_path

    # paths -------------------------------------------------------------------------
    @property
    def config_dir(self) -> Path:
        """The runtime YAML directory the controller watches; edit it to change the lab."""
        return self.state / "config"

    @property
    def bpf_pins(self) -> Path:
        """Where this lab's agents pin their BPF maps and links, one dir per node."""
        return BPF_PIN_ROOT / self.name

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    def node_dir(self, node: str) -> Path:
        return self.state / "nodes" / node

    @property
    def root_cert(self) -> Path:
        return self.state / "controller" / "root-cert.pem"

    # lifecycle ---------------------------------------------------------------------
    def up(
        self,
        config_dir: Path | None = None,
        timeout: float = 60.0,
        examples: Sequence[str] = (),
        scale_pods: int = 0,
    ) -> LabPlan:
        """Build the lab from ``config_dir`` (default: the bundled one) plus the named
        examples (`example_names()`), which the runtime config then holds as files too,
        plus ``scale_pods`` extra enrolled pods (`topology.scale_documents`)."""
        check_environment()
        self.down(quiet=True)
        source = config_dir or bundled_config_dir()
        files = sorted(p for p in source.iterdir() if p.suffix in (".yaml", ".yml"))
        files += [example_file(name) for name in examples]
        docs = documents_of((p.name, p.read_text()) for p in files)
        if scale_pods:
            docs[SCALE_FILE] = scale_documents(docs, scale_pods)
        lab_plan = plan(self.name, docs, lambda: str(uuid.uuid4()))
        self._write_state(lab_plan)
        say(f"building lab {self.name!r} from {source}")
        network.build_fabric(lab_plan)
        for node in lab_plan.nodes:
            network.build_node(lab_plan, node)
        for pod in lab_plan.pods:
            network.build_pod(lab_plan, pod)
            self._start_pod(pod)
        for pod in lab_plan.pods:
            self._wait_for_ports(pod, timeout)
        self._start_controller(lab_plan)
        self._wait_for(
            lambda: self.root_cert.exists(), timeout, "the controller's root cert", "controller"
        )
        for node in lab_plan.nodes:
            self._start_node(lab_plan, node)
        for node in lab_plan.nodes:
            self._wait_for(
                partial(self._ready, node),
                timeout,
                f"ztunnel on {node.name} to be ready",
                f"ztunnel-{node.name}",
            )
        for pod in (p for p in lab_plan.pods if p.waypoint):
            self._start_waypoint(lab_plan, pod, timeout)
        say(f"lab {self.name!r} is up: {len(lab_plan.nodes)} nodes, {len(lab_plan.pods)} pods")
        return lab_plan

    def down(self, quiet: bool = False) -> None:
        """Remove every process, cgroup, netns and file of this lab, whatever state it is in."""
        cgroups.remove_tree(cgroups.lab_root(self.name))
        removed = network.remove_namespaces(self.name)
        if self.bpf_pins.exists():  # the agents' pinned maps and links (bpffs)
            shutil.rmtree(self.bpf_pins)
        with contextlib.suppress(OSError):  # shared by labs: goes with the last one
            BPF_PIN_ROOT.rmdir()
        if self.state.exists():
            shutil.rmtree(self.state)
        if not quiet:
            say(f"lab {self.name!r} is down (removed {len(removed)} network namespaces)")

    def load_plan(self) -> LabPlan:
        path = self.state / "plan.json"
        if not path.exists():
            raise LabError(f"lab {self.name!r} is not up (no {path}); run: ambimesh lab up")
        raw = json.loads(path.read_text())
        return LabPlan(
            lab=raw["lab"],
            fabric_netns=raw["fabric_netns"],
            controller_address=raw["controller_address"],
            nodes=tuple(NodePlan(**n) for n in raw["nodes"]),
            pods=tuple(
                PodPlan(
                    **{
                        **p,
                        "commands": tuple(map(tuple, p["commands"])),
                        "ports": tuple(p["ports"]),
                        "waypoint_args": tuple(p.get("waypoint_args", ())),
                    }
                )
                for p in raw["pods"]
            ),
            services=tuple(
                ServicePlan(**{**s, "ports": tuple(map(tuple, s["ports"]))})
                for s in raw["services"]
            ),
        )

    def exec(self, pod_ref: str, argv: list[str]) -> int:
        """Run a command as the pod's own process: its netns, its cgroup, its hosts file."""
        return self.spawn_in_pod(pod_ref, argv, capture=False).wait()

    def run(self, pod_ref: str, argv: list[str], timeout: float = 30.0) -> CompletedProcess[str]:
        """`exec` with the output captured, for the demo and the tests."""
        proc = self.spawn_in_pod(pod_ref, argv, capture=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
            proc.wait()
        return CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())

    def spawn_in_pod(
        self, pod_ref: str, argv: list[str], capture: bool, stdin: int | None = None
    ) -> Popen[bytes]:
        """Start a process of the pod (see `exec`) without waiting for it."""
        try:
            pod = self.load_plan().pod(pod_ref)
        except KeyError as exc:
            raise LabError(str(exc.args[0])) from None
        cgroup = cgroups.pod_cgroup(self.name, pod.node, pod.uid)
        return procs.spawn(
            argv, cgroup=cgroup, netns_name=pod.netns, pod=True, stdin=stdin, capture=capture
        )

    def recreate_pod(self, pod_ref: str, timeout: float = 30.0) -> PodPlan:
        """Delete a pod and create it again with the same IP and a new uid, as a Deployment
        rollout or a node's pod eviction would: sandbox gone, API object replaced, new
        sandbox. Returns the new pod."""
        lab_plan = self.load_plan()
        try:
            old = lab_plan.pod(pod_ref)
        except KeyError as exc:
            raise LabError(str(exc.args[0])) from None
        new = dataclasses.replace(old, uid=str(uuid.uuid4()))
        say(f"re-creating pod {old.ref} at {old.address}: uid {old.uid} -> {new.uid}")
        cgroups.remove_tree(cgroups.pod_cgroup(self.name, old.node, old.uid))
        network.remove_pod(lab_plan, old)
        self._set_pod_uid(old, new.uid)
        network.build_pod(lab_plan, new)
        self._start_pod(new)
        if new.waypoint:
            self._start_waypoint(lab_plan, new, timeout)
        pods = tuple(new if p.ref == old.ref else p for p in lab_plan.pods)
        self._save_plan(dataclasses.replace(lab_plan, pods=pods))
        self._wait_for_ports(new, timeout)
        return new

    def _wait_for_ports(self, pod: PodPlan, timeout: float) -> None:
        for port in pod.ports:
            self._wait_for(
                partial(_listening, pod, port),
                timeout,
                f"pod {pod.ref} to listen on {port}",
                f"pod-{pod.namespace}-{pod.name}",
            )

    def _set_pod_uid(self, pod: PodPlan, uid: str) -> None:
        """Rewrite the pod's uid in the runtime config the controller watches."""
        for path in sorted(self.config_dir.glob("*.y*ml")):
            docs = list(yaml.safe_load_all(path.read_text()))
            for doc in docs:
                if not isinstance(doc, dict) or doc.get("kind") != "Pod":
                    continue
                meta = doc.get("metadata") or {}
                if meta.get("uid") == pod.uid:
                    meta["uid"] = uid
                    # Whole or not at all: the controller watching the directory must never
                    # read half a file (a truncated file can parse, minus some pods); it
                    # skips dotfiles.
                    partial = path.with_name(f".{path.name}.tmp")
                    partial.write_text(yaml.safe_dump_all(docs, sort_keys=False))
                    os.replace(partial, path)
                    return
        raise LabError(f"pod {pod.ref} (uid {pod.uid}) is not in {self.config_dir}")

    def status(self) -> str:
        lab_plan = self.load_plan()
        lines = [f"lab {self.name!r}: config {self.config_dir}, logs {self.logs}"]
        lines.append(f"  controller  {lab_plan.controller_target}  (netns {lab_plan.fabric_netns})")
        for node in lab_plan.nodes:
            ready = "ready" if self._ready(node) else "NOT ready"
            lines.append(
                f"  {node.name:<11} {node.address:<14} pods {node.pod_cidr}  "
                f"ztunnel {ready}  (netns {node.netns})"
            )
        for pod in lab_plan.pods:
            role = f"  waypoint {pod.namespace}/{pod.waypoint}" if pod.waypoint else ""
            lines.append(
                f"  pod {pod.ref:<22} {pod.address:<14} on {pod.node}  uid {pod.uid}{role}"
            )
        for svc in lab_plan.services:
            ports = ", ".join(f"{p}->{t}" for p, t in svc.ports)
            lines.append(f"  service {svc.namespace}/{svc.name:<14} {svc.vip:<14} {ports}")
        return "\n".join(lines)

    # internals ---------------------------------------------------------------------
    def _write_state(self, lab_plan: LabPlan) -> None:
        self.state.mkdir(parents=True, mode=0o700, exist_ok=True)
        self.config_dir.mkdir(exist_ok=True)
        for fname, docs in lab_plan.runtime_documents.items():
            (self.config_dir / fname).write_text(yaml.safe_dump_all(docs, sort_keys=False))
        self._save_plan(lab_plan)
        tokens = {node.name: secrets.token_urlsafe(32) for node in lab_plan.nodes}
        _write_private(self.state / "tokens.yaml", yaml.safe_dump(tokens))
        for node, token in tokens.items():
            self.node_dir(node).mkdir(parents=True, exist_ok=True)
            _write_private(self.node_dir(node) / "token", token)

    def _start_waypoint(self, lab_plan: LabPlan, pod: PodPlan, timeout: float) -> None:
        """The waypoint proxy of Gateway ``pod.waypoint``, as that pod's process. It
        authenticates with its node's join token (the lab's stand-in for the pod's projected
        service-account token) and waits for the controller like any pod would."""
        say(f"starting waypoint {pod.namespace}/{pod.waypoint} in pod {pod.ref}")
        argv = [
            sys.executable, "-m", "waypoint",
            "--node", pod.node,
            "--controller", lab_plan.controller_target,
            "--root-cert", str(self.root_cert),
            "--token-file", str(self.node_dir(pod.node) / "token"),
            "--name", pod.waypoint,
            "--namespace", pod.namespace,
            "--service-account", pod.service_account,
            *pod.waypoint_args,
        ]  # fmt: skip
        procs.spawn(
            argv,
            cgroup=cgroups.pod_cgroup(self.name, pod.node, pod.uid),
            netns_name=pod.netns,
            pod=True,
            log=self.logs / f"pod-{pod.namespace}-{pod.name}.log",
            env={"POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace},
        )
        self._wait_for(
            partial(_answers, pod, READINESS_PORT, "/healthz/ready"),
            timeout,
            f"waypoint {pod.ref} to be ready",
            f"pod-{pod.namespace}-{pod.name}",
        )

    def _save_plan(self, lab_plan: LabPlan) -> None:
        state = dataclasses.asdict(lab_plan)
        state.pop("runtime_documents")
        (self.state / "plan.json").write_text(json.dumps(state, indent=1))

    def _start_pod(self, pod: PodPlan) -> None:
        cgroup = cgroups.create(cgroups.pod_cgroup(self.name, pod.node, pod.uid))
        log_file = self.logs / f"pod-{pod.namespace}-{pod.name}.log"
        env = {"POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace}
        procs.spawn(
            ["sleep", "infinity"], cgroup=cgroup, netns_name=pod.netns, pod=True, log=log_file
        )
        for command in pod.commands:
            procs.spawn(
                command, cgroup=cgroup, netns_name=pod.netns, pod=True, log=log_file, env=env
            )

    def _start_controller(self, lab_plan: LabPlan) -> None:
        say(f"starting controller on {lab_plan.controller_target}")
        argv = [
            "--config-dir", str(self.config_dir),
            "--state-dir", str(self.root_cert.parent),
            "--listen", f"{lab_plan.controller_address}:{CONTROLLER_PORT}",
            "--metrics-listen", f"{lab_plan.controller_address}:{CONTROLLER_METRICS_PORT}",
            "--tokens", str(self.state / "tokens.yaml"),
        ]  # fmt: skip
        self._spawn_daemon("controller", None, lab_plan.fabric_netns, argv)

    def _start_node(self, lab_plan: LabPlan, node: NodePlan) -> None:
        say(f"starting agent and ztunnel on {node.name}")
        for component in COMPONENTS:
            self.start_component(node.name, component, lab_plan)

    def start_component(self, node: str, component: str, lab_plan: LabPlan | None = None) -> int:
        """Start a node's agent or ztunnel (again, e.g. after `kill_component`); its pid."""
        lab_plan = lab_plan or self.load_plan()
        netns = lab_plan.node(node).netns
        argv = [
            "--node", node,
            "--controller", lab_plan.controller_target,
            "--root-cert", str(self.root_cert),
            "--token-file", str(self.node_dir(node) / "token"),
        ]  # fmt: skip
        sock = str(self.node_dir(node) / "ztunnel.sock")
        if component == "agent":
            argv += ["--socket", sock, "--bpf-pin-dir", str(self.bpf_pins / node)]
        elif component == "ztunnel":
            argv += ["--agent-socket", sock, "--workers", str(self.ztunnel_workers)]
            # The file the process logs to anyway, size-capped (mesh/logfile.py).
            argv += ["--log-file", str(self.logs / f"ztunnel-{node}.log")]
            argv += ["--bpf-maps", str(self.bpf_pins / node / "maps")]
            if self.same_node_fast_path:
                argv.append("--same-node-fast-path")
            if self.cert_ttl:
                argv += ["--cert-ttl", str(self.cert_ttl)]
        else:
            raise LabError(f"unknown component {component!r}: one of {', '.join(COMPONENTS)}")
        return self._spawn_daemon(component, node, netns, argv)

    def _spawn_daemon(self, component: str, node: str | None, netns: str, args: list[str]) -> int:
        """``python -m <component> args`` in its own cgroup and the netns, logging to a file."""
        return procs.spawn(
            [sys.executable, "-m", component, *args],
            cgroup=cgroups.create(cgroups.component_cgroup(self.name, node, component)),
            netns_name=netns,
            pod=False,
            log=self.logs / (f"{component}-{node}.log" if node else f"{component}.log"),
        ).pid

    def restart_component(self, node: str, component: str, timeout: float = 60.0) -> int:
        """What a DaemonSet rolling update does; returns the new process's pid.

        ztunnel (surge): start the new one beside the old, wait until it is ready, then
        SIGTERM the old one, which hands over its listeners and drains. The agent: SIGTERM,
        wait for it to exit (capture stays pinned), start the new one, wait until ready.
        """
        cgroup = cgroups.component_cgroup(self.name, node, component)
        old = cgroups.pids(cgroup)
        if component == "ztunnel":
            pid = self.start_component(node, component)
            self._wait_for(
                partial(self._ztunnel_ready, self.load_plan().node(node), pid),
                timeout,
                f"the new ztunnel (pid {pid}) on {node} to be ready",
                f"ztunnel-{node}",
            )
            cgroups.signal_all(old, signal.SIGTERM)
            say(f"ztunnel on {node}: pid {pid} serves, {old or 'nothing'} draining")
            return pid
        cgroups.signal_all(old, signal.SIGTERM)
        self._wait_for(
            lambda: not cgroups.pids(cgroup), timeout, f"the old {component} to exit", component
        )
        pid = self.start_component(node, component)
        self.wait_ready(timeout)
        return pid

    def _ztunnel_ready(self, node: NodePlan, pid: int) -> bool:
        """That ztunnel process says it is ready (while two share the port, either answers)."""
        try:
            status, body = http_get(node.netns, node.address, READINESS_PORT, "/healthz/ready", 1.0)
        except OSError:
            return False
        return status == 200 and body.strip().endswith(f"pid={pid}")

    def kill_component(self, node: str, component: str) -> None:
        """SIGKILL a node's agent or ztunnel, as a crash would."""
        cgroups.kill(cgroups.component_cgroup(self.name, node, component))

    def stop_controller(self, timeout: float = 30.0) -> None:
        """A control-plane outage (or the first half of an upgrade): SIGTERM the controller
        and wait for it to exit. Nodes keep their last config and certificates."""
        cgroup = cgroups.component_cgroup(self.name, None, "controller")
        cgroups.signal_all(cgroups.pids(cgroup), signal.SIGTERM)
        self._wait_for(
            lambda: not cgroups.pids(cgroup), timeout, "the controller to exit", "controller"
        )
        say("controller stopped")

    def start_controller(self, timeout: float = 30.0) -> None:
        """Start the controller again and wait until it listens. Its CA root persists in the
        state dir, so it issues under the same root; its versions start again from 1."""
        lab_plan = self.load_plan()
        self._start_controller(lab_plan)
        self._wait_for(
            partial(_controller_listening, lab_plan),
            timeout,
            "the controller to listen",
            "controller",
        )

    def _ready(self, node: NodePlan) -> bool:
        """ztunnel serves every pod it was given, and the agent captured every enrolled pod."""
        try:
            status, _ = http_get(node.netns, node.address, READINESS_PORT, "/healthz/ready", 1.0)
            _, agent = http_get(node.netns, node.address, AGENT_METRICS_PORT, "/metrics", 1.0)
        except OSError:
            return False
        return status == 200 and all(line in agent.splitlines() for line in AGENT_READY)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until every node converged (e.g. after editing the runtime config)."""
        for node in self.load_plan().nodes:
            self._wait_for(
                partial(self._ready, node),
                timeout,
                f"{node.name} to be ready",
                f"agent-{node.name}",
            )

    def _wait_for(
        self, check: Callable[[], bool], timeout: float, what: str, log_name: str
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        tail = _tail(self.logs / f"{log_name}.log")
        raise LabError(
            f"timed out after {timeout:.0f}s waiting for {what}; "
            f"last lines of {self.logs}/{log_name}.log:\n{tail}"
        )


def _answers(pod: PodPlan, port: int, path: str) -> bool:
    """The pod answers 200 on ``path`` (asked from inside its own netns)."""
    try:
        status, _ = http_get(pod.netns, pod.address, port, path, 1.0)
    except OSError:
        return False
    return status == 200


def _controller_listening(lab_plan: LabPlan) -> bool:
    try:
        connect_in(
            lab_plan.fabric_netns, lab_plan.controller_address, CONTROLLER_PORT, timeout=1.0
        ).close()
    except OSError:
        return False
    return True


def _listening(pod: PodPlan, port: int) -> bool:
    """The pod's app accepts on ``port`` (checked on its loopback, which is never captured)."""
    try:
        connect_in(pod.netns, "127.0.0.1", port, timeout=1.0).close()
    except OSError:
        return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def say(message: str) -> None:
    print(f"[lab] {message}", flush=True)


def check_environment() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, cgroups, eBPF); run it with sudo")
    try:
        cgroup2_mount()
    except RuntimeError as exc:
        raise LabError(str(exc)) from None
    if shutil.which("ip") is None:
        raise LabError("iproute2's `ip` is missing; run scripts/setup.sh")
    if not Path("/proc/sys/net/core/bpf_jit_enable").exists():
        raise LabError("this kernel has no BPF support")
