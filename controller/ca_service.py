"""``CertificateAuthority.CreateCertificate``: a node gets certificates only for identities
of pods scheduled on it, as the current configuration snapshot says; a pod that is not a
node agent (a waypoint, authenticated by its own service-account token) only for its own."""

from __future__ import annotations

import datetime
import logging

import grpc

from controller.auth import AuthError, NodeAuthenticator
from controller.ca import CertificateAuthority, CsrError, csr_spiffe_id, load_csr
from controller.metrics import CertificateCounts
from controller.store import Store
from mesh.api import mesh_pb2, mesh_pb2_grpc
from mesh.spiffe import SpiffeError, SpiffeId

log = logging.getLogger(__name__)


Context = grpc.aio.ServicerContext[
    mesh_pb2.CreateCertificateRequest, mesh_pb2.CreateCertificateResponse
]


class CertificateService(mesh_pb2_grpc.CertificateAuthorityServicer):
    def __init__(
        self,
        ca: CertificateAuthority,
        store: Store,
        authenticator: NodeAuthenticator,
        counts: CertificateCounts | None = None,
    ) -> None:
        self._ca = ca
        self._store = store
        self._auth = authenticator
        self.counts = counts or CertificateCounts()

    def identities_on(self, node: str) -> set[SpiffeId]:
        out: set[SpiffeId] = set()
        for resource in self._store.current.resources.values():
            if resource.WhichOneof("kind") != "workload" or resource.workload.node != node:
                continue
            w = resource.workload
            try:
                out.add(SpiffeId(w.trust_domain, w.namespace, w.service_account))
            except SpiffeError as e:
                log.warning("workload %s/%s has no valid identity: %s", w.namespace, w.name, e)
        return out

    async def CreateCertificate(
        self, request: mesh_pb2.CreateCertificateRequest, context: Context
    ) -> mesh_pb2.CreateCertificateResponse:
        counts = self.counts
        counts.requests += 1
        try:
            caller = await self._auth.authenticate(context.invocation_metadata() or ())
        except AuthError as e:
            counts.authentication_failures += 1
            log.warning("certificate request from %s refused: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        try:
            csr_pem = request.csr_pem.encode()
            spiffe_id = csr_spiffe_id(load_csr(csr_pem))
        except (CsrError, UnicodeEncodeError) as e:
            counts.bad_csrs += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad CSR: {e}")
        node = caller.node
        if spiffe_id not in self.identities_on(node):
            message = (
                f"node {node} may not obtain a certificate for {spiffe_id.uri}: no pod with "
                f"that identity is scheduled on node {node} in configuration version "
                f"{self._store.current.version}"
            )
            counts.denied += 1
            log.warning("%s", message)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        if caller.identity not in (None, (spiffe_id.namespace, spiffe_id.service_account)):
            message = (
                f"a pod of service account {'/'.join(caller.identity or ())} on node {node} "
                f"may obtain a certificate for its own identity only, not {spiffe_id.uri}"
            )
            counts.denied += 1
            log.warning("%s", message)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        ttl = datetime.timedelta(seconds=request.ttl_seconds) if request.ttl_seconds > 0 else None
        try:
            chain = self._ca.sign(csr_pem, spiffe_id, ttl)
        except CsrError as e:
            counts.bad_csrs += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad CSR: {e}")
        counts.issued += 1
        log.info("issued a certificate for %s to node %s", spiffe_id.uri, node)
        return mesh_pb2.CreateCertificateResponse(
            cert_chain_pem=[c.decode() for c in chain], root_pem=self._ca.root_pem.decode()
        )
