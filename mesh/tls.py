"""Mutual TLS 1.3 for HBONE: SSL contexts from in-memory identities, peers named by SPIFFE ID.

Peers are identified by the SPIFFE URI SAN of their leaf certificate, never by DNS name, so
hostname checking is off and every caller must check `peer_identity` against the identity it
expected.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from mesh.spiffe import SpiffeError, SpiffeId

# Certificates are read by OpenSSL through the ssl module, as it decodes a peer's
# (`getpeercert()`), not by the `cryptography` package, whose ~9 MiB resident the proxies
# do without (mesh.keygen). The same decoder for our own leaf and for DER bytes; CPython
# has had it since 3.x (its test suite uses it).
_decode_cert_file = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]

Decoded = dict[str, Any]  # getpeercert()'s form: subject, notAfter, subjectAltName, ...

ALPN_H2 = "h2"


class TlsError(Exception):
    """Base of every TLS and identity error raised by the mesh."""


class CertificateError(TlsError):
    """A certificate or key that cannot be used as a mesh identity."""


class PeerIdentityError(TlsError):
    """The peer's certificate does not name the SPIFFE identity we need."""


@dataclass(frozen=True)
class TlsIdentity:
    """A workload's certificate chain (leaf first), private key and the mesh trust root."""

    cert_chain_pem: bytes
    key_pem: bytes
    root_pem: bytes

    def __repr__(self) -> str:
        # Keep key material out of logs and tracebacks.
        return f"TlsIdentity({self.spiffe_id}, not_after={self.not_after.isoformat()})"

    @cached_property
    def _leaf(self) -> Decoded:
        try:
            return decode_pem(self.cert_chain_pem)  # the first certificate: the leaf
        except ValueError as exc:
            raise CertificateError(f"certificate chain is not valid PEM: {exc}") from exc

    @property
    def spiffe_id(self) -> SpiffeId:
        return spiffe_id_of(self._leaf)

    @property
    def not_after(self) -> datetime:
        """Expiry of the leaf certificate (timezone-aware, UTC)."""
        return datetime.fromtimestamp(ssl.cert_time_to_seconds(self._leaf["notAfter"]), UTC)


def decode_pem(pem: bytes) -> Decoded:
    """The first certificate of ``pem``, decoded; ValueError if there is none."""
    with _secret_file(pem) as path:
        try:
            decoded: Decoded = _decode_cert_file(path)
        except ssl.SSLError as exc:
            raise ValueError(str(exc)) from exc
    return decoded


def _subject(cert: Decoded) -> str:
    return ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)


def spiffe_id_of(cert: Decoded) -> SpiffeId:
    """The single SPIFFE ID in a (decoded) certificate's URI SANs."""
    san = cert.get("subjectAltName")
    if not san:
        raise PeerIdentityError(
            f"certificate {_subject(cert)!r} has no subjectAltName; "
            "mesh certificates must carry a spiffe:// URI SAN (was it issued by the mesh CA?)"
        )
    uris = [value for kind, value in san if kind == "URI" and value.startswith("spiffe://")]
    if not uris:
        raise PeerIdentityError(
            f"certificate {_subject(cert)!r} has no spiffe:// URI SAN; "
            "it is not a mesh workload certificate"
        )
    if len(uris) > 1:
        raise PeerIdentityError(
            f"certificate carries {len(uris)} SPIFFE IDs ({', '.join(uris)}); "
            "a mesh certificate must name exactly one"
        )
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeError as exc:
        raise PeerIdentityError(f"certificate SPIFFE ID is malformed: {exc}") from exc


def peer_identity(peer: ssl.SSLObject | ssl.SSLSocket | bytes) -> SpiffeId:
    """The SPIFFE ID of the peer of a completed handshake (or of a DER leaf certificate)."""
    if isinstance(peer, bytes):
        der: bytes | None = peer
    else:
        # A verified peer (our contexts require one) comes decoded already.
        decoded = peer.getpeercert()
        if isinstance(decoded, dict) and decoded:
            return spiffe_id_of(decoded)
        der = peer.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError(
            "peer presented no certificate; mesh peers must authenticate with mTLS"
        )
    try:
        cert = decode_pem(ssl.DER_cert_to_PEM_cert(der).encode("ascii"))
    except ValueError as exc:
        raise PeerIdentityError(f"peer certificate cannot be parsed: {exc}") from exc
    return spiffe_id_of(cert)


def server_context(identity: TlsIdentity) -> ssl.SSLContext:
    """An HBONE server context: TLS 1.3, ALPN h2, client certificates required; no session
    tickets, since our clients never resume (asyncio keeps no sessions): each would cost the
    server an encryption per handshake and every client connection a stored session with
    our certificate chain, ~2-3 KiB per HBONE connection and end."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, identity)
    ctx.num_tickets = 0
    return ctx


def client_context(identity: TlsIdentity) -> ssl.SSLContext:
    """An HBONE client context: TLS 1.3, ALPN h2, server verified against the mesh root."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, identity)


def _context(protocol: int, identity: TlsIdentity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN_H2])
    try:
        ctx.load_verify_locations(cadata=identity.root_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise CertificateError(f"trust root is not a valid PEM certificate: {exc}") from exc
    load_identity(ctx, identity)
    return ctx


def load_identity(ctx: ssl.SSLContext, identity: TlsIdentity) -> None:
    """Put ``identity``'s certificate and key into ``ctx``; on renewal, new handshakes use
    the new certificate while established connections keep theirs."""
    with (
        _secret_file(identity.cert_chain_pem) as cert_path,
        _secret_file(identity.key_pem) as key_path,
    ):
        try:
            ctx.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise CertificateError(
                f"cannot load certificate chain and key (does the key match the leaf?): {exc}"
            ) from exc


@contextlib.contextmanager
def _secret_file(content: bytes) -> Iterator[str]:
    """A path holding `content` for OpenSSL to read, never visible on a filesystem.

    `SSLContext.load_cert_chain` only takes paths. An anonymous memfd gives it one
    (/proc/self/fd/N) without the key ever touching a disk or a directory; where memfd
    is missing, fall back to a 0600 file in a private 0700 directory, removed at once.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("ambimesh-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, content)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="ambimesh-tls-") as directory:
        path = os.path.join(directory, "secret.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)
        yield path
