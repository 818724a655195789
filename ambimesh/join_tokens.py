"""``ambimesh token create NODE``: a join token for a host outside Kubernetes.

The token goes into the controller's tokens file (the one its ``--tokens`` names; the
controller re-reads it when it changes, no restart) and is printed once, on stdout alone,
so ``ambimesh token create vm-1 > token`` captures exactly the token for the node's
``--token-file``. It is never shown again: lose it and ``--rotate`` makes a new one.

The file is rewritten whole through a new file of mode 0600 renamed over the old one, so
the controller never reads half a file and the tokens are never readable by others, even
for a moment; an exclusive lock on a sibling ``.lock`` file serializes concurrent runs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from controller.auth import TokensFileError, parse_tokens

DEFAULT_TOKENS = Path("/etc/ambimesh/tokens.yaml")
TOKEN_BYTES = 32
# A Kubernetes node name: a DNS subdomain.
_NODE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


class TokenCreateError(Exception):
    """The token cannot be created; the message says why and what to do."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="join tokens for hosts outside Kubernetes")
    token_sub = token.add_subparsers(dest="action", required=True)
    create = token_sub.add_parser(
        "create", help="write a new join token for NODE into the controller's tokens file"
    )
    create.add_argument("node", help="the node's name (its --node)")
    create.add_argument(
        "--tokens",
        type=Path,
        default=DEFAULT_TOKENS,
        help=f"the controller's tokens file (its --tokens; default {DEFAULT_TOKENS})",
    )
    create.add_argument(
        "--rotate", action="store_true", help="replace NODE's token if it already has one"
    )


def run(args: argparse.Namespace) -> int:
    try:
        token = create(args.tokens, args.node, rotate=args.rotate)
    except TokenCreateError as e:
        print(f"ambimesh: {e}", file=sys.stderr)
        return 1
    print(token)
    print(
        f"join token for node {args.node} written to {args.tokens}; it is not shown again: "
        "put it in the node's --token-file (mode 0600)",
        file=sys.stderr,
    )
    return 0


def create(path: Path, node: str, rotate: bool = False) -> str:
    """A new token for ``node``, written into ``path`` (created if missing)."""
    if not _NODE.fullmatch(node):
        raise TokenCreateError(
            f"{node!r} is not a node name: lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(path):
        tokens = _read(path)
        if node in tokens and not rotate:
            raise TokenCreateError(
                f"node {node} already has a token in {path}: pass --rotate to replace it"
            )
        token = secrets.token_urlsafe(TOKEN_BYTES)
        tokens[node] = token
        _write(path, tokens)
    return token


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise TokenCreateError(f"cannot read {path}: {e.strerror}") from None
    try:
        return {node: token.decode() for node, token in parse_tokens(path, text).items()}
    except TokensFileError as e:
        raise TokenCreateError(f"{e}; fix it first, nothing was written") from None


def _write(path: Path, tokens: dict[str, str]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(tokens, f, default_flow_style=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
