"""Asking the controller's CA for a workload certificate (synchronous gRPC over TLS)."""

from __future__ import annotations

import grpc

from mesh.api import mesh_pb2, mesh_pb2_grpc
from mesh.keepalive import KEEPALIVE

DEFAULT_TIMEOUT = 10.0

_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is the controller running and reachable, and does its "
    "serving certificate name this address?",
    grpc.StatusCode.UNAUTHENTICATED: "check this node's join token",
    grpc.StatusCode.PERMISSION_DENIED: "the controller only signs identities of pods "
    "scheduled on this node; is the pod's spec.nodeName this node?",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the controller did not answer in time",
}


class CertificateError(Exception):
    """The CA did not issue a certificate; the message says why and what to check."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def request_certificate(
    target: str,
    root_cert_pem: bytes,
    token: str,
    csr_pem: bytes,
    ttl_seconds: int,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[list[bytes], bytes]:
    """(chain PEMs leaf first, root PEM) for the identity ``csr_pem`` asks for."""
    credentials = grpc.ssl_channel_credentials(root_certificates=root_cert_pem)
    request = mesh_pb2.CreateCertificateRequest(csr_pem=csr_pem.decode(), ttl_seconds=ttl_seconds)
    with grpc.secure_channel(target, credentials, KEEPALIVE.client_options()) as channel:
        stub = mesh_pb2_grpc.CertificateAuthorityStub(channel)
        try:
            response = stub.CreateCertificate(
                request, timeout=timeout, metadata=(("authorization", f"Bearer {token}"),)
            )
        except grpc.RpcError as e:
            code = e.code()
            hint = _HINTS.get(code)
            message = f"certificate request to {target} failed: {code.name}: {e.details()}"
            raise CertificateError(f"{message} ({hint})" if hint else message, code) from None
    chain = [pem.encode() for pem in response.cert_chain_pem]
    if not chain:
        raise CertificateError(f"the CA at {target} returned an empty certificate chain")
    return chain, response.root_pem.encode()
