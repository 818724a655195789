"""The controller's own metrics, under istiod's names where istiod has one, so that Istio's
control-plane dashboards and alerts read them (docs/metrics.md).

istiod's counters carry no ``_total`` (``pilot_xds_pushes``, ``citadel_server_csr_count``);
prometheus-client appends it to every counter, so those are exposed untyped under the
exact name: PromQL's ``rate`` and ``increase`` read them as they read a counter. Our own
metrics (``ambimesh_controller_*``) are ordinary counters. Counts are plain integers
bumped on the event loop's thread and read by the scrape thread: no lock on the push path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# istiod's label for what a push carried: one stream here carries ztunnel's workload
# discovery (addresses, services) and its authorization policies, as Istio's "wds" does.
XDS_TYPE = "wds"

# istiod's buckets for pilot_proxy_convergence_time (seconds), below a second finer: the
# controller's target is every node within one (bench/controller_scale.py).
CONVERGENCE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0)


@dataclass
class PushCounts:
    """What the push streams did: responses written, NACKs received."""

    pushes: int = 0
    rejects: int = 0


@dataclass
class CertificateCounts:
    """What the CA answered: every request lands in ``requests`` and at most one other."""

    requests: int = 0
    issued: int = 0
    authentication_failures: int = 0
    bad_csrs: int = 0
    denied: int = 0


@dataclass
class ControllerMetrics:
    push: PushCounts = field(default_factory=PushCounts)
    certificates: CertificateCounts = field(default_factory=CertificateCounts)
    convergence: Histogram = field(
        default_factory=lambda: Histogram(
            "pilot_proxy_convergence_time",
            "Seconds from a configuration version's publication to a node's ACK of it "
            "(nodes that connected later are not counted: their first push is no change).",
            buckets=CONVERGENCE_BUCKETS,
            registry=None,
        )
    )


def _untyped(name: str, documentation: str, value: float, labels: dict[str, str]) -> Metric:
    metric = Metric(name, documentation, "unknown")
    metric.add_sample(name, labels, value)
    return metric


class ControllerCollector(Collector):
    """Reads ``metrics`` and, at scrape time, what the other parts hold: the connected
    streams, the configuration's serial and the source's rejections. The root's expiry
    (Unix time) is fixed for the process's life."""

    def __init__(
        self,
        metrics: ControllerMetrics,
        *,
        connected_streams: Callable[[], int],
        root_not_after: float,
        config_serial: Callable[[], int],
        config_rejects: Callable[[], int],
    ) -> None:
        self.metrics = metrics
        self.connected_streams = connected_streams
        self.root_not_after = root_not_after
        self.config_serial = config_serial
        self.config_rejects = config_rejects

    def collect(self) -> Iterator[Metric]:
        push, certs = self.metrics.push, self.metrics.certificates
        xds = {"type": XDS_TYPE}
        yield GaugeMetricFamily(
            "pilot_xds",
            "Push streams connected (each node agent, ztunnel process and waypoint).",
            value=self.connected_streams(),
        )
        yield _untyped(
            "pilot_xds_pushes", "Configuration responses written (counter).", push.pushes, xds
        )
        yield _untyped(
            "pilot_total_xds_rejects",
            "Versions a node rejected (NACK) (counter).",
            push.rejects,
            xds,
        )
        yield from self.metrics.convergence.collect()
        yield _untyped(
            "citadel_server_csr_count", "Certificate requests (counter).", certs.requests, {}
        )
        yield _untyped(
            "citadel_server_success_cert_issuance_count",
            "Certificates issued (counter).",
            certs.issued,
            {},
        )
        yield _untyped(
            "citadel_server_authentication_failure_count",
            "Certificate requests whose caller failed authentication (counter).",
            certs.authentication_failures,
            {},
        )
        yield _untyped(
            "citadel_server_csr_parsing_err_count",
            "Certificate requests with an unreadable CSR (counter).",
            certs.bad_csrs,
            {},
        )
        yield GaugeMetricFamily(
            "citadel_server_root_cert_expiry_timestamp",
            "Unix time at which the CA's root certificate expires.",
            value=self.root_not_after,
        )
        yield CounterMetricFamily(
            "ambimesh_controller_certificates_denied",
            "Certificate requests for an identity the caller may not hold (no pod of it on "
            "the node, or a pod asking for another identity).",
            value=certs.denied,
        )
        yield CounterMetricFamily(
            "ambimesh_controller_config_versions",
            "Configuration versions published to the nodes.",
            value=self.config_serial(),
        )
        yield CounterMetricFamily(
            "ambimesh_controller_config_rejects",
            "Configurations the controller refused; the last good one stayed in force.",
            value=self.config_rejects(),
        )
