"""The mesh CA: root on disk, leaf issuance rules, serving certificates."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from controller.ca import CAError, CertificateAuthority, CsrError
from mesh.csr import make_key_and_csr
from mesh.spiffe import SpiffeId

WEB = SpiffeId("cluster.local", "demo", "web")


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "state", "cluster.local")


def verify(leaf_pem: bytes, root_pem: bytes) -> x509.Certificate:
    leaf = x509.load_pem_x509_certificate(leaf_pem)
    root = x509.load_pem_x509_certificate(root_pem)
    leaf.verify_directly_issued_by(root)
    return leaf


def test_root_files_and_permissions(tmp_path: Path, ca: CertificateAuthority) -> None:
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "root-key.pem").stat().st_mode) == 0o600
    assert (state / "root-cert.pem").read_bytes() == ca.root_pem
    again = CertificateAuthority.load_or_create(state, "cluster.local")
    assert again.root_pem == ca.root_pem


def test_mismatched_root_pair_is_refused(tmp_path: Path) -> None:
    a = CertificateAuthority.load_or_create(tmp_path / "a", "cluster.local")
    CertificateAuthority.load_or_create(tmp_path / "b", "cluster.local")
    (tmp_path / "b" / "root-cert.pem").write_bytes(a.root_pem)
    with pytest.raises(CAError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path / "b", "cluster.local")


def test_leaf_verifies_and_carries_the_identity(ca: CertificateAuthority) -> None:
    _, csr = make_key_and_csr(WEB)
    chain = ca.sign(csr, WEB)
    assert len(chain) == 1
    leaf = verify(chain[0], ca.root_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WEB.uri]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


@pytest.mark.parametrize(
    ("ttl", "expected"),
    [
        (None, datetime.timedelta(hours=24)),
        (datetime.timedelta(0), datetime.timedelta(hours=24)),
        (datetime.timedelta(hours=1), datetime.timedelta(hours=1)),
        (datetime.timedelta(days=30), datetime.timedelta(hours=24)),
    ],
)
def test_ttl_clamp(
    ca: CertificateAuthority, ttl: datetime.timedelta | None, expected: datetime.timedelta
) -> None:
    _, csr = make_key_and_csr(WEB)
    before = datetime.datetime.now(datetime.UTC)
    leaf = verify(ca.sign(csr, WEB, ttl)[0], ca.root_pem)
    lifetime = leaf.not_valid_after_utc - before
    assert (
        expected - datetime.timedelta(seconds=5)
        <= lifetime
        <= expected + datetime.timedelta(seconds=5)
    )


def test_wrong_san_is_rejected(ca: CertificateAuthority) -> None:
    _, csr = make_key_and_csr(SpiffeId("cluster.local", "demo", "admin"))
    with pytest.raises(CsrError, match=r"asks for spiffe://cluster.local/ns/demo/sa/admin"):
        ca.sign(csr, WEB)


def csr_with(names: list[x509.GeneralName]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        (b"garbage", "not a PEM"),
        (csr_with([]), "no subjectAltName"),
        (
            csr_with([x509.UniformResourceIdentifier(WEB.uri), x509.DNSName("web.demo")]),
            "exactly one SAN",
        ),
        (csr_with([x509.UniformResourceIdentifier("https://web.demo")]), "not a SPIFFE ID"),
    ],
)
def test_bad_csrs(ca: CertificateAuthority, csr: bytes, message: str) -> None:
    with pytest.raises(CsrError, match=message):
        ca.sign(csr, WEB)


def test_tampered_csr_signature_is_rejected(ca: CertificateAuthority) -> None:
    _, csr_pem = make_key_and_csr(WEB)
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0xFF
    tampered = b"".join(
        [
            b"-----BEGIN CERTIFICATE REQUEST-----\n",
            base64.encodebytes(bytes(der)),
            b"-----END CERTIFICATE REQUEST-----\n",
        ]
    )
    with pytest.raises(CsrError, match="signature does not verify"):
        ca.sign(tampered, WEB)


def test_serving_cert_has_dns_and_ip_sans(ca: CertificateAuthority) -> None:
    serving = ca.serving_cert(["controller.local", "127.0.0.1"])
    leaf = verify(serving.chain_pem, ca.root_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["controller.local"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert b"PRIVATE KEY" in serving.key_pem
