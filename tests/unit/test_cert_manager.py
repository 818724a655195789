"""mesh.cert_manager.CertManager with a fake blocking fetch: single flight, caching, failures,
renewal at half-life into the same SSLContext objects, retry with backoff, retry_now when the
controller is back, forget, close, the certificate metrics. (The schedule's arithmetic is in
test_renewal.py.)"""

from __future__ import annotations

import asyncio
import datetime
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from mesh.cert_manager import CertManager
from mesh.cert_metrics import CertCollector
from mesh.renewal import RenewalPolicy
from mesh.spiffe import SpiffeId
from mesh.tls import TlsIdentity
from tests.unit.certs import CertAuthority, make_ca, make_leaf

TIMEOUT = 5.0
SID = SpiffeId("cluster.local", "demo", "client")
OTHER = SpiffeId("cluster.local", "demo", "server")
LONG = datetime.timedelta(hours=1)
SHORT = datetime.timedelta(seconds=2.2)  # renewed ~1 s after it is issued
# Retries 0.3 s apart, whatever the validity left.
FAST = RenewalPolicy(initial_backoff=0.3, max_backoff=0.3, min_retry=0.3, jitter=0.0)
# A failed renewal is not tried again within any test's time: only retry_now brings it on.
STALLED = RenewalPolicy(initial_backoff=3600.0, max_backoff=3600.0, min_retry=3600.0)


@pytest.fixture(scope="module")
def ca() -> CertAuthority:
    return make_ca()


MakeManager = Callable[..., CertManager]


class Boom(RuntimeError):
    pass


@dataclass
class Step:
    lifetime: datetime.timedelta = LONG
    error: str | None = None
    mismatched_key: bool = False


class FakeFetch:
    """Blocking, like the gRPC call: answers from a script of steps (the last one repeats),
    optionally held at a gate; records every call."""

    def __init__(self, ca: CertAuthority, steps: list[Step] | None = None) -> None:
        self.ca = ca
        self.steps = steps or [Step()]
        self.calls: list[SpiffeId] = []
        self.issued: list[TlsIdentity] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, sid: SpiffeId) -> TlsIdentity:
        with self._lock:
            n = len(self.calls)
            self.calls.append(sid)
        self.entered.set()
        if not self.gate.wait(TIMEOUT):
            raise TimeoutError("test gate never opened")
        step = self.steps[min(n, len(self.steps) - 1)]
        if step.error is not None:
            raise Boom(step.error)
        leaf = make_leaf(self.ca, sid, lifetime=step.lifetime)
        if step.mismatched_key:
            leaf = replace(leaf, key_pem=make_leaf(self.ca, sid).key_pem)
        with self._lock:
            self.issued.append(leaf)
        return leaf


@pytest.fixture
async def manager(ca: CertAuthority) -> AsyncIterator[MakeManager]:
    made: list[tuple[CertManager, FakeFetch]] = []

    def make(fetch: FakeFetch, policy: RenewalPolicy | None = None) -> CertManager:
        mgr = CertManager(fetch, policy)
        made.append((mgr, fetch))
        return mgr

    yield make
    for mgr, fetch in made:
        fetch.gate.set()  # never leave an executor thread blocked
        mgr.close()


async def wait_until(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def leaf_der(ident: TlsIdentity) -> bytes:
    return x509.load_pem_x509_certificate(ident.cert_chain_pem).public_bytes(
        serialization.Encoding.DER
    )


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[bytes, bytes]:
    """An in-memory TLS handshake; the certificates each side presented: (server's, client's)."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(20):
        done = 0
        for obj in (c, s):
            try:
                obj.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            break
    server_cert = c.getpeercert(binary_form=True)
    client_cert = s.getpeercert(binary_form=True)
    assert server_cert is not None and client_cert is not None
    return server_cert, client_cert


def expiry(mgr: CertManager, sid: SpiffeId = SID) -> datetime.datetime:
    return dict(mgr.expiries())[sid]


# -- fetching and caching --------------------------------------------------------------


async def test_concurrent_callers_share_one_fetch(ca: CertAuthority, manager: MakeManager) -> None:
    fetch = FakeFetch(ca)
    fetch.gate.clear()
    mgr = manager(fetch)
    clients = [asyncio.create_task(mgr.client_context(SID)) for _ in range(5)]
    servers = [asyncio.create_task(mgr.server_context(SID)) for _ in range(3)]
    await wait_until(fetch.entered.is_set)
    await asyncio.sleep(0.05)  # every caller is waiting now
    assert len(fetch.calls) == 1
    fetch.gate.set()
    got_clients = await asyncio.wait_for(asyncio.gather(*clients), TIMEOUT)
    got_servers = await asyncio.wait_for(asyncio.gather(*servers), TIMEOUT)
    assert fetch.calls == [SID]
    assert all(ctx is got_clients[0] for ctx in got_clients)
    assert all(ctx is got_servers[0] for ctx in got_servers)
    assert got_clients[0] is not got_servers[0]


async def test_contexts_are_cached_per_identity(ca: CertAuthority, manager: MakeManager) -> None:
    fetch = FakeFetch(ca)
    mgr = manager(fetch)
    client = await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    server = await asyncio.wait_for(mgr.server_context(SID), TIMEOUT)
    assert await asyncio.wait_for(mgr.client_context(SID), TIMEOUT) is client
    assert await asyncio.wait_for(mgr.server_context(SID), TIMEOUT) is server
    assert fetch.calls == [SID]
    assert client.protocol == ssl.PROTOCOL_TLS_CLIENT
    assert server.protocol == ssl.PROTOCOL_TLS_SERVER

    other = await asyncio.wait_for(mgr.client_context(OTHER), TIMEOUT)
    assert other is not client
    assert fetch.calls == [SID, OTHER]
    assert dict(mgr.expiries()).keys() == {SID, OTHER}
    # the contexts carry the fetched certificate
    server_cert, client_cert = handshake(client, server)
    assert server_cert == client_cert == leaf_der(fetch.issued[0])


async def test_fetch_failure_reaches_every_waiter_and_a_later_call_retries(
    ca: CertAuthority, manager: MakeManager
) -> None:
    fetch = FakeFetch(ca, [Step(error="CA unavailable"), Step()])
    fetch.gate.clear()
    mgr = manager(fetch)
    waiters = [asyncio.create_task(mgr.client_context(SID)) for _ in range(3)]
    waiters.append(asyncio.create_task(mgr.server_context(SID)))
    await wait_until(fetch.entered.is_set)
    await asyncio.sleep(0.05)
    fetch.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), TIMEOUT)
    assert all(isinstance(r, Boom) and str(r) == "CA unavailable" for r in results), results
    assert len(fetch.calls) == 1
    assert mgr.expiries() == []

    ctx = await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    assert isinstance(ctx, ssl.SSLContext)
    assert len(fetch.calls) == 2


async def test_cancelling_the_first_caller_does_not_cancel_the_others(
    ca: CertAuthority, manager: MakeManager
) -> None:
    fetch = FakeFetch(ca)
    fetch.gate.clear()
    mgr = manager(fetch)
    first = asyncio.create_task(mgr.client_context(SID))
    await wait_until(fetch.entered.is_set)
    second = asyncio.create_task(mgr.client_context(SID))
    await asyncio.sleep(0.05)
    first.cancel()
    await asyncio.sleep(0.05)
    fetch.gate.set()
    await asyncio.wait({second}, timeout=TIMEOUT)
    assert second.done()
    assert not second.cancelled()
    assert isinstance(second.result(), ssl.SSLContext)


# -- renewal ---------------------------------------------------------------------------


async def test_renewal_at_half_life_loads_into_the_same_contexts(
    ca: CertAuthority, manager: MakeManager
) -> None:
    fetch = FakeFetch(ca, [Step(lifetime=SHORT), Step(lifetime=LONG)])
    mgr = manager(fetch)
    client = await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    server = await asyncio.wait_for(mgr.server_context(SID), TIMEOUT)
    old = fetch.issued[0]
    assert expiry(mgr) == old.not_after

    await asyncio.sleep(0.4)
    assert len(fetch.calls) == 1  # not before half-life

    await wait_until(lambda: len(fetch.issued) == 2)
    new = fetch.issued[1]
    await wait_until(lambda: expiry(mgr) == new.not_after)
    assert new.not_after > old.not_after
    assert await asyncio.wait_for(mgr.client_context(SID), TIMEOUT) is client
    assert await asyncio.wait_for(mgr.server_context(SID), TIMEOUT) is server
    # both contexts now present the new certificate
    server_cert, client_cert = handshake(client, server)
    assert server_cert == client_cert == leaf_der(new)

    await asyncio.sleep(0.3)
    assert len(fetch.calls) == 2  # the long-lived one is not renewed right away


async def test_failed_renewal_keeps_the_old_certificate_and_retries(
    ca: CertAuthority,
    manager: MakeManager,
) -> None:
    fetch = FakeFetch(ca, [Step(lifetime=SHORT), Step(error="CA unavailable"), Step(lifetime=LONG)])
    mgr = manager(fetch, FAST)
    client = await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    server = await asyncio.wait_for(mgr.server_context(SID), TIMEOUT)
    old = fetch.issued[0]

    await wait_until(lambda: len(fetch.calls) == 2)
    await asyncio.sleep(0.05)
    assert expiry(mgr) == old.not_after
    assert handshake(client, server) == (leaf_der(old), leaf_der(old))

    await wait_until(lambda: len(fetch.issued) == 2)
    new = fetch.issued[1]
    await wait_until(lambda: expiry(mgr) == new.not_after)
    assert handshake(client, server) == (leaf_der(new), leaf_der(new))
    assert len(fetch.calls) == 3


async def test_unloadable_renewal_keeps_the_old_certificate_and_retries(
    ca: CertAuthority,
    manager: MakeManager,
) -> None:
    fetch = FakeFetch(ca, [Step(lifetime=SHORT), Step(mismatched_key=True), Step(lifetime=LONG)])
    mgr = manager(fetch, FAST)
    client = await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    server = await asyncio.wait_for(mgr.server_context(SID), TIMEOUT)
    old = fetch.issued[0]
    await wait_until(lambda: len(fetch.calls) >= 2)
    await asyncio.sleep(0.05)
    assert expiry(mgr) == old.not_after
    assert handshake(client, server) == (leaf_der(old), leaf_der(old))
    await wait_until(lambda: len(fetch.calls) >= 3, timeout=2.0)
    await wait_until(lambda: expiry(mgr) == fetch.issued[-1].not_after)


async def test_forget_stops_renewal(ca: CertAuthority, manager: MakeManager) -> None:
    fetch = FakeFetch(ca, [Step(lifetime=SHORT), Step(lifetime=SHORT)])
    mgr = manager(fetch)
    await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    await asyncio.wait_for(mgr.client_context(OTHER), TIMEOUT)
    mgr.forget(SID)
    assert dict(mgr.expiries()).keys() == {OTHER}
    started = time.monotonic()
    await wait_until(lambda: OTHER in fetch.calls[2:])  # OTHER renews: time has come
    await asyncio.sleep(max(0.0, 1.3 - (time.monotonic() - started)))
    assert fetch.calls.count(SID) == 1

    # used again: fetched afresh
    await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    assert fetch.calls.count(SID) == 2


async def test_close_cancels_renewal(ca: CertAuthority, manager: MakeManager) -> None:
    fetch = FakeFetch(ca, [Step(lifetime=SHORT)])
    mgr = manager(fetch)
    await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    await asyncio.wait_for(mgr.server_context(OTHER), TIMEOUT)
    mgr.close()
    await asyncio.sleep(1.5)  # past both half-lives
    assert len(fetch.calls) == 2


# -- the controller away and back ------------------------------------------------------


async def failed_renewals(mgr: CertManager, count: int) -> None:
    await wait_until(lambda: any(s.failed_renewals >= count for s in mgr.status()))


async def test_retry_now_brings_a_backed_off_renewal_on_at_once(
    ca: CertAuthority, manager: MakeManager
) -> None:
    fetch = FakeFetch(
        ca, [Step(lifetime=SHORT), Step(error="controller down"), Step(lifetime=LONG)]
    )
    mgr = manager(fetch, STALLED)
    client = await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    server = await asyncio.wait_for(mgr.server_context(SID), TIMEOUT)
    await failed_renewals(mgr, 1)  # at half-life; the next try would be an hour later
    assert len(fetch.calls) == 2

    mgr.retry_now()
    await wait_until(lambda: len(fetch.issued) == 2)
    new = fetch.issued[1]
    await wait_until(lambda: expiry(mgr) == new.not_after)
    assert handshake(client, server) == (leaf_der(new), leaf_der(new))
    assert len(fetch.calls) == 3


async def test_retry_now_leaves_healthy_certificates_alone(
    ca: CertAuthority, manager: MakeManager
) -> None:
    fetch = FakeFetch(ca)
    mgr = manager(fetch)
    await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    mgr.retry_now()
    await asyncio.sleep(0.2)
    assert fetch.calls == [SID]


async def test_an_expired_certificate_is_still_retried_and_replaced(
    ca: CertAuthority, manager: MakeManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mesh.cert_manager")
    down = Step(error="controller down")
    fetch = FakeFetch(ca, [Step(lifetime=SHORT), *[down] * 6, Step(lifetime=LONG)])
    mgr = manager(fetch, FAST)  # tries ~1.1 s, 1.4 s, ... 2.6 s: the last ones after expiry
    client = await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    server = await asyncio.wait_for(mgr.server_context(SID), TIMEOUT)
    await wait_until(lambda: len(fetch.issued) == 2)
    await wait_until(lambda: expiry(mgr) == fetch.issued[1].not_after)
    assert handshake(client, server) == (leaf_der(fetch.issued[1]),) * 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("EXPIRED" in m and "next try in" in m for m in messages), messages
    assert any("renewed after 6 failed tries" in m for m in messages), messages


async def test_metrics_show_time_left_and_failed_renewals(
    ca: CertAuthority, manager: MakeManager
) -> None:
    fetch = FakeFetch(ca, [Step(lifetime=SHORT), Step(error="controller down")])
    mgr = manager(fetch, STALLED)
    registry = CollectorRegistry()
    registry.register(CertCollector(mgr))
    assert (
        registry.get_sample_value("ambimesh_certificate_expiry_seconds", {"identity": SID.uri})
        is None
    )

    await asyncio.wait_for(mgr.client_context(SID), TIMEOUT)
    left = registry.get_sample_value("ambimesh_certificate_expiry_seconds", {"identity": SID.uri})
    assert left is not None and 0 < left <= SHORT.total_seconds()
    failures = {"identity": SID.uri}
    assert registry.get_sample_value("ambimesh_certificate_renewal_failures_total", failures) == 0
    await failed_renewals(mgr, 1)
    assert registry.get_sample_value("ambimesh_certificate_renewal_failures_total", failures) == 1
