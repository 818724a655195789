"""The `ambimesh` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ambimesh import join_tokens, status, validate, ztunnel_config
from ambimesh.install import command as install_command
from ambimesh.lab import demo
from ambimesh.lab.lab import DEFAULT_LAB, Lab, LabError, example_names
from ambimesh.lab.topology import PlanError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambimesh", description="ambient service mesh")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command", required=True)
    install_command.add_parsers(sub)
    join_tokens.add_parsers(sub)
    validate.add_parsers(sub)
    status.add_parsers(sub)
    ztunnel_config.add_parsers(sub)
    lab = sub.add_parser("lab", help="the local lab mesh (network namespaces on this machine)")
    lab.add_argument("--name", default=DEFAULT_LAB, help="lab name (prefix of its namespaces)")
    lab_sub = lab.add_subparsers(dest="action", required=True)
    up = lab_sub.add_parser("up", help="build the lab (after removing any earlier one)")
    up.add_argument("--config", type=Path, help="YAML directory (default: the bundled one)")
    up.add_argument(
        "--example",
        action="append",
        default=[],
        choices=example_names(),
        help="add an example configuration (repeatable), e.g. seed-canary: the seed's "
        "VirtualService and DestinationRule verbatim, in namespace default",
    )
    up.add_argument(
        "--scale-pods",
        type=int,
        default=0,
        metavar="N",
        help="add N enrolled pods (namespace scale, spread over the nodes, 10 per service "
        "account, no app process) to measure ztunnel at scale",
    )
    lab_sub.add_parser("down", help="remove every namespace, cgroup, process of the lab")
    lab_sub.add_parser("status", help="nodes, pods, services and readiness")
    lab_sub.add_parser("demo", help="call server from client across nodes; show wire + metrics")
    rs = lab_sub.add_parser("restart", help="rolling restart of a node's agent or ztunnel")
    rs.add_argument("node")
    rs.add_argument("component", choices=["agent", "ztunnel"])
    rc = lab_sub.add_parser("recreate", help="delete a pod and create it again (same IP, new uid)")
    rc.add_argument("pod", help="namespace/name, or a name unique across namespaces")
    ex = lab_sub.add_parser("exec", help="run a command as a pod's process (like kubectl exec)")
    ex.add_argument("pod", help="namespace/name, or a name unique across namespaces")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- command ...")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "install":
        sys.exit(install_command.run_install(args))
    if args.command == "uninstall":
        sys.exit(install_command.run_uninstall(args))
    if args.command == "token":
        sys.exit(join_tokens.run(args))
    if args.command == "validate":
        sys.exit(validate.run(args))
    if args.command == "status":
        sys.exit(status.run(args))
    if args.command == "ztunnel-config":
        sys.exit(ztunnel_config.run(args))
    lab = Lab(args.name)
    try:
        if args.action == "up":
            lab.up(args.config, examples=args.example, scale_pods=args.scale_pods)
            print(lab.status())
        elif args.action == "down":
            lab.down()
        elif args.action == "status":
            print(lab.status())
        elif args.action == "demo":
            sys.exit(demo.run(lab))
        elif args.action == "restart":
            lab.restart_component(args.node, args.component)
        elif args.action == "recreate":
            pod = lab.recreate_pod(args.pod)
            print(f"pod {pod.ref} re-created at {pod.address} with uid {pod.uid}")
        elif args.action == "exec":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                raise LabError("nothing to run: ambimesh lab exec POD -- COMMAND ...")
            sys.exit(lab.exec(args.pod, command))
    except (LabError, PlanError) as exc:
        print(f"ambimesh: {exc}", file=sys.stderr)
        sys.exit(1)
