"""The ``ambimesh install`` and ``ambimesh uninstall`` subcommands."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from agent.uninstall import DEFAULT_SOCKET, UninstallError, uninstall
from ambimesh.install import DEFAULT_NAMESPACE, ValuesError, dump, load_values, render
from bpf.loader import DEFAULT_PIN_DIR, BpfError
from controller.ca import ROOT_CERT_FILE, ROOT_KEY_FILE, CAError, CertificateAuthority


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inst = sub.add_parser(
        "install",
        help="install on Kubernetes (kubectl apply), or print the manifests (--dry-run)",
    )
    inst.add_argument("--dry-run", action="store_true", help="print the manifests, apply nothing")
    inst.add_argument(
        "-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)"
    )
    inst.add_argument(
        "--set", action="append", default=[], metavar="PATH=VALUE", help="one value (repeatable)"
    )
    inst.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE)
    inst.add_argument(
        "--create-ca",
        type=Path,
        metavar="DIR",
        help="only write a new mesh root (root-cert.pem, root-key.pem) into DIR and say how "
        "to load it into the cluster",
    )
    un = sub.add_parser(
        "uninstall",
        help="remove every BPF program, pin, link and socket ambimesh left on this node",
    )
    un.add_argument("--pin-dir", default=DEFAULT_PIN_DIR, help="the agent's --bpf-pin-dir")
    un.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's --socket")
    un.add_argument(
        "--cgroup-root",
        help="detach programs under this cgroup only (default: the whole cgroup v2 hierarchy)",
    )


def run_install(args: argparse.Namespace) -> int:
    if args.create_ca is not None:
        return _create_ca(args.create_ca, args.namespace, args.set)
    try:
        text = dump(render(load_values(args.values, args.set), args.namespace))
    except ValuesError as exc:
        print(f"ambimesh install: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        print(
            "ambimesh install: kubectl is not on PATH; install it, or apply the output of "
            "`ambimesh install --dry-run` yourself",
            file=sys.stderr,
        )
        return 1
    return subprocess.run([kubectl, "apply", "-f", "-"], input=text, text=True).returncode


def _create_ca(directory: Path, namespace: str, sets: list[str]) -> int:
    if (directory / ROOT_KEY_FILE).exists():
        print(f"ambimesh install: {directory / ROOT_KEY_FILE} exists; not replacing a root")
        return 1
    try:
        trust_domain = load_values(sets=sets)["trustDomain"]
        CertificateAuthority.load_or_create(directory, trust_domain)
    except (ValuesError, CAError, OSError) as exc:
        print(f"ambimesh install: {exc}", file=sys.stderr)
        return 1
    cert, key = directory / ROOT_CERT_FILE, directory / ROOT_KEY_FILE
    print(
        f"wrote a new mesh root for trust domain {trust_domain} in {directory}. Load it:\n"
        f"  kubectl create namespace {namespace}\n"
        f"  kubectl -n {namespace} create secret generic ambimesh-ca "
        f"--from-file={cert} --from-file={key}\n"
        f"  kubectl -n {namespace} create configmap ambimesh-root-cert --from-file={cert}\n"
        f"and keep {key} offline (or delete it) once the Secret exists."
    )
    return 0


def run_uninstall(args: argparse.Namespace) -> int:
    try:
        report = uninstall(args.pin_dir, args.cgroup_root, args.socket)
    except (UninstallError, BpfError) as exc:
        print(f"ambimesh uninstall: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0
