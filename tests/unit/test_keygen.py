"""mesh.keygen: a key and CSR from a child process, and the proxies never import cryptography."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh import keygen
from mesh.spiffe import SpiffeId

SID = SpiffeId("cluster.local", "demo", "web")


def test_child_makes_a_matching_key_and_csr() -> None:
    key_pem, csr_pem = keygen.make_key_and_csr(SID)
    key = serialization.load_pem_private_key(key_pem, password=None)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SID.uri]


def test_a_failing_child_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(keygen.KeygenError, match="exit 1"):
        keygen.make_key_and_csr(SID)


def test_proxies_do_not_load_cryptography() -> None:
    code = (
        "import sys, ztunnel.main, waypoint.main, mesh.node_config; "
        "print(sorted(m for m in sys.modules if m.startswith(('cryptography', 'pyroute2'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
