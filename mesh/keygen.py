"""A workload key and CSR made in a short-lived child process (``python -m mesh.csr``).

The `cryptography` package is only needed for this (the proxies parse certificates with
the `ssl` module, mesh.tls), and loading it costs every long-lived process ~9 MiB of
resident memory (its Rust extension alone ~8 MiB). A child pays that instead, for a
fraction of a second, once per identity and renewal (every 12 h by default). The key
reaches us over a pipe; it never touches a disk.
"""

from __future__ import annotations

import subprocess
import sys

from mesh.spiffe import SpiffeId

TIMEOUT_SECONDS = 30.0
_CSR_BEGIN = b"-----BEGIN CERTIFICATE REQUEST-----"


class KeygenError(RuntimeError):
    """The child could not make a key and CSR."""


def make_key_and_csr(spiffe_id: SpiffeId) -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM) as `mesh.csr.make_key_and_csr` makes them (blocking)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mesh.csr", spiffe_id.uri],
            capture_output=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KeygenError(f"key generation for {spiffe_id} failed: {exc}") from exc
    key_pem, begin, csr_rest = done.stdout.partition(_CSR_BEGIN)
    if done.returncode != 0 or not begin or b"PRIVATE KEY" not in key_pem:
        error = done.stderr.decode(errors="replace").strip()[-500:]
        raise KeygenError(
            f"key generation for {spiffe_id} failed (exit {done.returncode}): {error}"
        )
    return key_pem, begin + csr_rest
