"""A fresh workload key and the CSR that asks the mesh CA for its SPIFFE identity."""

from __future__ import annotations

import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.spiffe import SpiffeId


def make_key_and_csr(spiffe_id: SpiffeId) -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM): ECDSA P-256, the SPIFFE ID as the only SAN, an empty subject."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def main(argv: list[str]) -> int:
    """``python -m mesh.csr SPIFFE_URI``: the key PEM, then the CSR PEM, on stdout (what
    `mesh.keygen` runs, so the proxies never load cryptography)."""
    if len(argv) != 1:
        print("usage: python -m mesh.csr spiffe://TRUST_DOMAIN/ns/NS/sa/SA", file=sys.stderr)
        return 2
    key_pem, csr_pem = make_key_and_csr(SpiffeId.parse(argv[0]))
    sys.stdout.buffer.write(key_pem + csr_pem)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
