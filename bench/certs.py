"""Workload certificates for the Envoy pair, from the lab's own CA.

The Envoys get what a ztunnel gets for a pod: an ECDSA P-256 key, a leaf signed by the
lab's root with the pod's SPIFFE ID as its only SAN. Same chain, same key type, so the
handshakes of both tunnel pairs cost the same.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.envoy import TlsFiles
from controller.ca import CertificateAuthority
from mesh.csr import make_key_and_csr
from mesh.spiffe import SpiffeId


def issue(ca_dir: Path, identity: SpiffeId, out_dir: Path, name: str) -> TlsFiles:
    """Sign a fresh key for ``identity`` with the CA kept in ``ca_dir``; files in ``out_dir``."""
    ca = CertificateAuthority.load_or_create(ca_dir, identity.trust_domain)
    key_pem, csr_pem = make_key_and_csr(identity)
    chain = ca.sign(csr_pem, identity)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(out_dir / f"{name}.pem", out_dir / f"{name}.key", out_dir / "root-cert.pem")
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    files.cert.write_bytes(b"".join(chain))
    files.ca.write_bytes(ca.root_pem)
    return files
