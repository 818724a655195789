"""What every node component (agent, ztunnel) needs to reach the controller: the same
command-line flags, and the credentials they point at."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mesh.api import mesh_pb2
from mesh.cert_client import request_certificate
from mesh.keygen import make_key_and_csr
from mesh.push_client import PushClient
from mesh.spiffe import SpiffeId
from mesh.tls import TlsIdentity


class NodeConfigError(RuntimeError):
    """A credential file is missing or unreadable; the message names it."""


def add_controller_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", required=True, help="this node's name")
    parser.add_argument("--controller", required=True, help="controller address host:port")
    parser.add_argument("--root-cert", required=True, type=Path, help="mesh root CA (PEM)")
    parser.add_argument("--token-file", required=True, type=Path, help="this node's join token")


@dataclass(frozen=True)
class ControllerAccess:
    node: str
    target: str
    root_pem: bytes
    token: str = field(repr=False)
    # Re-read for every use: the kubelet rotates projected service-account tokens.
    token_file: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ControllerAccess:
        try:
            root = Path(args.root_cert).read_bytes()
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise NodeConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        if not token:
            raise NodeConfigError(f"{args.token_file} is empty: it must hold this node's token")
        return cls(args.node, args.controller, root, token, Path(args.token_file))

    def current_token(self) -> str:
        """The token file's content now; the one read at start if it cannot be read."""
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError:
                return self.token
            if token:
                return token
        return self.token

    def fetch_identity(self, sid: SpiffeId, ttl_seconds: int) -> TlsIdentity:
        """A fresh key and a certificate for ``sid`` from the controller's CA (blocking)."""
        key_pem, csr_pem = make_key_and_csr(sid)
        chain, root_pem = request_certificate(
            self.target, self.root_pem, self.current_token(), csr_pem, ttl_seconds
        )
        return TlsIdentity(b"".join(chain), key_pem, root_pem)

    def push_client(
        self,
        on_update: Callable[[str, Mapping[str, mesh_pb2.Resource]], None],
        on_connected: Callable[[], None] | None = None,
    ) -> PushClient:
        return PushClient(
            self.target,
            self.root_pem,
            self.current_token,
            self.node,
            on_update,
            on_connected=on_connected,
        )
