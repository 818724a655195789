"""Where `ambimesh status` and `ambimesh ztunnel-config` find a node's ports and the controller.

A node's ztunnel admin view (:15000) listens on 127.0.0.1 only, and the agent's metrics
(:15014) are read there too, so the CLI runs where that loopback is:

- ``--lab [NAME]``: a lab on this machine. Each lab node is a network namespace; the CLI
  opens its sockets inside the node's namespace (the controller's: inside the fabric's),
  as ``ambimesh lab`` itself does (ambimesh/lab/netclient.py).
- otherwise this host, a node installed with the systemd units (or, on Kubernetes, a
  shell in the node DaemonSet's pod, whose containers share one loopback). Its node name
  is $AMBIMESH_NODE, else $NODE_NAME (the DaemonSet's), else /etc/default/ambimesh's
  AMBIMESH_NODE, else the host name; another node's ports are out of reach from here.

The controller counts as reachable when a TLS handshake to its gRPC port succeeds with a
serving certificate for the address nodes use, issued under the mesh root: what a node's
gRPC channel checks before anything else, without needing a node's join token.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ambimesh.lab.lab import DEFAULT_LAB, STATE_ROOT, Lab, LabError
from ambimesh.lab.netclient import connect_in, http_get_over

ZTUNNEL_ADMIN_PORT = 15000
ENV_FILE = Path("/etc/default/ambimesh")  # deploy/systemd/ambimesh.env
DEFAULT_ROOT_CERT = Path("/etc/ambimesh/root-cert.pem")  # the systemd units' --root-cert
TIMEOUT_SECONDS = 3.0


class CliError(RuntimeError):
    """The command cannot do its job; the message says what to do next."""


@dataclass(frozen=True)
class Node:
    name: str
    netns: str | None  # the lab node's network namespace; None: this host
    check_hint: str  # how the user checks that the node's processes run

    def get(self, port: int, path: str, what: str) -> str:
        """GET ``path`` from 127.0.0.1:``port`` on this node; CliError naming ``what``."""
        where = f"{what} at 127.0.0.1:{port} on node {self.name}"
        try:
            sock = _connect(self.netns, "127.0.0.1", port)
        except OSError as exc:
            raise CliError(
                f"cannot reach {where} ({exc.strerror or exc}): is it running? ({self.check_hint})"
            ) from None
        try:
            status, body = http_get_over(sock, "127.0.0.1", port, path, TIMEOUT_SECONDS)
        except (OSError, http.client.HTTPException) as exc:
            raise CliError(f"{where} did not answer {path} ({exc}) ({self.check_hint})") from None
        if status != 200:
            raise CliError(f"{where} answered {path} with HTTP {status}: {body[:200]}")
        return body


@dataclass(frozen=True)
class Controller:
    target: str  # host:port, as the nodes are configured; "" when not known here
    netns: str | None
    root_cert: Path
    missing_hint: str = ""  # why target is empty and how to give it

    def check(self) -> tuple[bool, str]:
        """(reachable, what was seen or what to do)."""
        if not self.target:
            return False, self.missing_hint
        host, _, port = self.target.rpartition(":")
        host = host.strip("[]")
        try:
            root = self.root_cert.read_bytes()
        except OSError as exc:
            return (
                False,
                f"cannot read the mesh root {self.root_cert} ({exc.strerror}): pass --root-cert",
            )
        try:
            context = ssl.create_default_context(cadata=root.decode())
        except (ssl.SSLError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            return False, f"{self.root_cert} is not a PEM CA certificate ({exc}): pass --root-cert"
        context.set_alpn_protocols(["h2"])
        try:
            sock = _connect(self.netns, host, int(port))
        except (OSError, ValueError) as exc:
            return (
                False,
                f"cannot connect to {self.target} ({exc}): is the controller running there?",
            )
        try:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                version = tls.version()
        except (OSError, ssl.SSLError) as exc:
            return False, f"TLS to {self.target} failed ({exc}): not this mesh's controller?"
        finally:
            sock.close()
        return True, f"{version}, serving certificate for {host} under the mesh root"


@dataclass(frozen=True)
class Scope:
    """The nodes and controller one command looks at."""

    nodes: tuple[Node, ...]
    controller: Controller
    lab: str | None


def add_scope_flags(parser: argparse.ArgumentParser, node_help: str) -> None:
    parser.add_argument(
        "--lab",
        nargs="?",
        const=DEFAULT_LAB,
        metavar="NAME",
        help=f"look at a lab on this machine (default name {DEFAULT_LAB!r}), not at this host",
    )
    parser.add_argument("--node", help=node_help)


def add_controller_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--controller",
        metavar="HOST:PORT",
        help="the controller as nodes reach it (default: $AMBIMESH_CONTROLLER, else "
        f"{ENV_FILE}'s); not with --lab",
    )
    parser.add_argument(
        "--root-cert",
        type=Path,
        default=DEFAULT_ROOT_CERT,
        help="the mesh root CA, to check the controller's certificate (default: %(default)s)",
    )


def resolve(args: argparse.Namespace) -> Scope:
    """The nodes ``--lab``/``--node`` select, and the controller; CliError if none fits."""
    if args.lab is not None:
        return _lab_scope(args.lab, args.node)
    return _host_scope(args)


def _lab_scope(name: str, node: str | None) -> Scope:
    try:
        lab = Lab(name)
        plan = lab.load_plan()
    except LabError as exc:
        running = ", ".join(running_labs(STATE_ROOT)) or "none"
        raise CliError(f"{exc} (labs up on this machine: {running})") from None
    names = [n.name for n in plan.nodes]
    if node is not None and node not in names:
        raise CliError(f"no node {node!r} in lab {name!r}; its nodes: {', '.join(names)}")
    hint = f"ambimesh lab --name {name} status"
    nodes = tuple(Node(n.name, n.netns, hint) for n in plan.nodes if node in (None, n.name))
    controller = Controller(plan.controller_target, plan.fabric_netns, lab.root_cert)
    return Scope(nodes, controller, name)


def running_labs(state_root: Path) -> list[str]:
    """Names of the labs whose plan is on disk (what `lab up` leaves until `lab down`)."""
    return sorted(p.parent.name for p in state_root.glob("*/plan.json"))


def _host_scope(args: argparse.Namespace) -> Scope:
    env = read_env_file(ENV_FILE)
    here = this_node(os.environ, env, socket.gethostname)
    if args.node is not None and args.node != here:
        raise CliError(
            f"this host is node {here!r}, not {args.node!r}: ztunnel's admin port is "
            f"localhost-only, so run the command on {args.node} (on Kubernetes: kubectl exec "
            f"into the ambimesh node pod on {args.node}); for a lab add --lab NAME"
        )
    hint = "systemctl status ambimesh-ztunnel ambimesh-agent; for a lab add --lab NAME"
    target = getattr(args, "controller", None) or os.environ.get(
        "AMBIMESH_CONTROLLER", env.get("AMBIMESH_CONTROLLER", "")
    )
    controller = Controller(
        target,
        None,
        getattr(args, "root_cert", DEFAULT_ROOT_CERT),
        "controller address unknown: pass --controller HOST:PORT or set AMBIMESH_CONTROLLER",
    )
    return Scope((Node(here, None, hint),), controller, None)


def this_node(
    environ: Mapping[str, str],
    env_file: Mapping[str, str],
    hostname: Callable[[], str],
) -> str:
    """This host's node name, as its agent and ztunnel were told it (see the module doc)."""
    return (
        environ.get("AMBIMESH_NODE")
        or environ.get("NODE_NAME")
        or env_file.get("AMBIMESH_NODE")
        or hostname()
    )


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a systemd EnvironmentFile (comments, blanks skipped); {} if none."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            values[key.strip()] = value.strip().strip("\"'")
    return values


def _connect(netns: str | None, host: str, port: int) -> socket.socket:
    if netns is not None:
        return connect_in(netns, host, port, TIMEOUT_SECONDS)
    return socket.create_connection((host, port), TIMEOUT_SECONDS)
