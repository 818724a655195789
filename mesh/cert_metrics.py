"""Prometheus view of a CertManager: how long each identity's certificate stays valid and
how often its renewal failed, so an alert fires while there is still time to act (a
controller outage longer than half a certificate's lifetime shows as failures first).

``ambimesh_certificate_expiry_seconds`` has the meaning of Istio's
``istio_agent_cert_expiry_seconds``: the time left, negative once expired.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.cert_manager import CertStatus


class CertSource(Protocol):
    def status(self) -> list[CertStatus]: ...


class CertCollector(Collector):
    def __init__(self, certs: CertSource) -> None:
        self.certs = certs

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "ambimesh_certificate_expiry_seconds",
            "Seconds until the identity's certificate expires (negative once expired).",
            labels=["identity"],
        )
        failures = CounterMetricFamily(
            "ambimesh_certificate_renewal_failures",
            "Failed renewal tries of the identity's certificate (each is retried).",
            labels=["identity"],
        )
        now = time.time()
        for status in self.certs.status():
            expiry.add_metric([status.identity.uri], status.not_after.timestamp() - now)
            failures.add_metric([status.identity.uri], status.failed_renewals)
        yield expiry
        yield failures
