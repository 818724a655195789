"""TLS contexts and SPIFFE peer identity, checked against real certificates."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mesh.spiffe import SpiffeId
from mesh.tls import (
    CertificateError,
    PeerIdentityError,
    TlsIdentity,
    client_context,
    peer_identity,
    server_context,
)
from tests.unit.certs import CertAuthority, make_ca, make_leaf

CLIENT = SpiffeId("cluster.local", "default", "client")
SERVER = SpiffeId("cluster.local", "prod", "server")


@pytest.fixture(scope="module")
def ca() -> CertAuthority:
    return make_ca()


def _der(identity: TlsIdentity) -> bytes:
    return x509.load_pem_x509_certificate(identity.cert_chain_pem).public_bytes(Encoding.DER)


def test_identity_reads_spiffe_id_and_expiry(ca: CertAuthority) -> None:
    identity = make_leaf(ca, SERVER, lifetime=timedelta(hours=2))
    assert identity.spiffe_id == SERVER
    remaining = identity.not_after - datetime.now(UTC)
    assert timedelta(hours=1, minutes=59) < remaining <= timedelta(hours=2)


def test_repr_hides_key(ca: CertAuthority) -> None:
    identity = make_leaf(ca, SERVER)
    assert b"PRIVATE KEY" in identity.key_pem
    assert "PRIVATE" not in repr(identity)
    assert SERVER.uri in repr(identity)


@pytest.mark.parametrize(
    ("spiffe_id", "extra_uris", "message"),
    [
        (None, (), "no subjectAltName|no spiffe"),
        (None, ("https://example.com/",), "no spiffe:// URI SAN"),
        (SERVER, ("spiffe://cluster.local/ns/x/sa/y",), "2 SPIFFE IDs"),
        (None, ("spiffe://cluster.local/not/a/workload",), "malformed"),
    ],
)
def test_peer_identity_rejects_bad_sans(
    ca: CertAuthority, spiffe_id: SpiffeId | None, extra_uris: tuple[str, ...], message: str
) -> None:
    identity = make_leaf(ca, spiffe_id, extra_uris=extra_uris)
    with pytest.raises(PeerIdentityError, match=message):
        peer_identity(_der(identity))


def test_peer_identity_from_der(ca: CertAuthority) -> None:
    assert peer_identity(_der(make_leaf(ca, CLIENT))) == CLIENT


def test_peer_identity_rejects_empty_and_garbage() -> None:
    with pytest.raises(PeerIdentityError, match="no certificate"):
        peer_identity(b"")
    with pytest.raises(PeerIdentityError, match="cannot be parsed"):
        peer_identity(b"\x30\x03junk")


def test_contexts_are_tls13_mutual_h2(ca: CertAuthority) -> None:
    for ctx in (server_context(make_leaf(ca, SERVER)), client_context(make_leaf(ca, CLIENT))):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
    assert server_context(make_leaf(ca, SERVER)).num_tickets == 0  # nobody resumes


def test_key_mismatch_is_reported(ca: CertAuthority) -> None:
    a, b = make_leaf(ca, SERVER), make_leaf(ca, CLIENT)
    mixed = TlsIdentity(a.cert_chain_pem, b.key_pem, a.root_pem)
    with pytest.raises(CertificateError, match="key match"):
        server_context(mixed)


def test_bad_root_is_reported(ca: CertAuthority) -> None:
    leaf = make_leaf(ca, SERVER)
    with pytest.raises(CertificateError, match="trust root"):
        client_context(TlsIdentity(leaf.cert_chain_pem, leaf.key_pem, b"not pem"))


def test_no_key_material_left_in_open_files(ca: CertAuthority) -> None:
    before = set(os.listdir("/proc/self/fd"))
    client_context(make_leaf(ca, CLIENT))
    assert set(os.listdir("/proc/self/fd")) <= before


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[SpiffeId, SpiffeId, str | None]:
    """Blocking mTLS handshake over a socketpair; returns (client's view, server's view, ALPN)."""
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    result: dict[str, SpiffeId] = {}
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as tls:
                result["server_sees"] = peer_identity(tls)
                tls.sendall(b"k")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(a, server_side=False) as tls:
            client_sees = peer_identity(tls)
            alpn = tls.selected_alpn_protocol()
            assert tls.recv(1) == b"k"
    finally:
        thread.join(5)
    if errors:
        raise errors[0]
    return client_sees, result["server_sees"], alpn


def test_mutual_handshake_names_both_peers(ca: CertAuthority) -> None:
    client_sees, server_sees, alpn = _handshake(
        server_context(make_leaf(ca, SERVER)), client_context(make_leaf(ca, CLIENT))
    )
    assert (client_sees, server_sees, alpn) == (SERVER, CLIENT, "h2")


def test_server_from_other_ca_is_rejected(ca: CertAuthority) -> None:
    other = make_ca("other root")
    with pytest.raises(ssl.SSLError):
        _handshake(server_context(make_leaf(other, SERVER)), client_context(make_leaf(ca, CLIENT)))
