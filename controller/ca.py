"""The mesh certificate authority: a self-signed root kept in a state directory.

The root key never leaves ``<state-dir>/root-key.pem`` (mode 0600, directory 0700) and is
never logged. Leaves are workload identities (one SPIFFE URI SAN) or the controller's own
gRPC serving certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.spiffe import SpiffeError, SpiffeId

log = logging.getLogger(__name__)

ROOT_KEY_FILE = "root-key.pem"
ROOT_CERT_FILE = "root-cert.pem"
DEFAULT_TTL = datetime.timedelta(hours=24)
MAX_TTL = datetime.timedelta(hours=24)
ROOT_VALIDITY = datetime.timedelta(days=3650)
SERVING_VALIDITY = datetime.timedelta(days=365)
# Tolerate small clock differences between the controller and the nodes.
BACKDATE = datetime.timedelta(minutes=5)


class CAError(Exception):
    """The CA cannot start or cannot issue a certificate."""


class CsrError(CAError):
    """A certificate signing request the CA refuses; the message says why."""


@dataclass(frozen=True)
class ServingCert:
    key_pem: bytes
    chain_pem: bytes


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, root: x509.Certificate) -> None:
        self._key = key
        self._root = root
        self.root_pem = root.public_bytes(serialization.Encoding.PEM)
        self.root_not_after = root.not_valid_after_utc

    @classmethod
    def load_or_create(cls, state_dir: Path, trust_domain: str) -> CertificateAuthority:
        """The CA whose root lives in ``state_dir``, creating the root on first start."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        key_path, cert_path = state_dir / ROOT_KEY_FILE, state_dir / ROOT_CERT_FILE
        if key_path.exists():
            return cls._load(key_path, cert_path)
        key = ec.generate_private_key(ec.SECP256R1())
        root = _self_signed_root(key, trust_domain)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        cert_path.write_bytes(root.public_bytes(serialization.Encoding.PEM))
        log.info("created a new mesh root CA in %s", state_dir)
        return cls(key, root)

    @classmethod
    def _load(cls, key_path: Path, cert_path: Path) -> CertificateAuthority:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s had mode %o; tightening to 0600", key_path, mode)
            os.chmod(key_path, 0o600)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            root = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as e:
            raise CAError(
                f"cannot load the root CA from {key_path.parent}: {e}; restore "
                f"{ROOT_KEY_FILE} and {ROOT_CERT_FILE}, or move both away to create a new root"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != root.public_key():
            raise CAError(f"{key_path} does not match {cert_path}: restore the pair together")
        return cls(key, root)

    def sign(
        self, csr_pem: bytes, spiffe_id: SpiffeId, ttl: datetime.timedelta | None = None
    ) -> list[bytes]:
        """A leaf for ``spiffe_id``, leaf first; the root is :attr:`root_pem`, not in the chain.

        A TTL of zero or none means the default; longer than :data:`MAX_TTL` is clamped.
        """
        csr = load_csr(csr_pem)
        requested = csr_spiffe_id(csr)
        if requested != spiffe_id:
            raise CsrError(f"the CSR asks for {requested.uri}, but only {spiffe_id.uri} is allowed")
        if ttl is None or ttl <= datetime.timedelta(0):
            ttl = DEFAULT_TTL
        ttl = min(ttl, MAX_TTL)
        now = datetime.datetime.now(datetime.UTC)
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)])
        builder = (
            self._leaf_builder(
                csr.public_key(), now, min(now + ttl, self._root.not_valid_after_utc)
            )
            .subject_name(x509.Name([]))
            .add_extension(san, critical=True)
        )
        return [self._sign(builder)]

    def serving_cert(self, hosts: list[str]) -> ServingCert:
        """A fresh key and certificate for the controller's gRPC server, valid for ``hosts``."""
        if not hosts:
            raise CAError("the serving certificate needs at least one host name or IP")
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            self._leaf_builder(
                key.public_key(), now, min(now + SERVING_VALIDITY, self._root.not_valid_after_utc)
            )
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return ServingCert(key_pem=key_pem, chain_pem=self._sign(builder))

    def _leaf_builder(
        self,
        public_key: object,
        now: datetime.datetime,
        not_after: datetime.datetime,
    ) -> x509.CertificateBuilder:
        if not isinstance(
            public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)
        ):
            raise CsrError("unsupported key type: use ECDSA (P-256/P-384), RSA >= 2048 or Ed25519")
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < 2048:
            raise CsrError(f"RSA key of {public_key.key_size} bits is too small: use at least 2048")
        return (
            x509.CertificateBuilder()
            .issuer_name(self._root.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=True,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )

    def _sign(self, builder: x509.CertificateBuilder) -> bytes:
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A parsed CSR whose self-signature checks out."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise CsrError(f"not a PEM certificate signing request: {e}") from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError, TypeError):
        valid = False
    if not valid:
        raise CsrError("the CSR's signature does not verify against its own public key")
    return csr


def csr_spiffe_id(csr: x509.CertificateSigningRequest) -> SpiffeId:
    """The one SPIFFE ID a CSR may ask for: exactly one URI SAN and no other names."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrError("the CSR has no subjectAltName: put the SPIFFE ID in a URI SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(san) != 1:
        raise CsrError(f"the CSR must carry exactly one SAN, a SPIFFE URI; it has {len(san)}")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeError as e:
        raise CsrError(str(e)) from None


def _self_signed_root(key: ec.EllipticCurvePrivateKey, trust_domain: str) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "ambimesh root CA"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
