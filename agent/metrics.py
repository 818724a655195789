"""The agent's Prometheus metrics (ambimesh_*), read live from the agent and BPF maps."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.node_agent import NodeAgent


class AgentCollector(Collector):
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        enrolled = [e for e in self.agent.enrolled.values() if e.attachment is not None]
        yield GaugeMetricFamily(
            "ambimesh_enrolled_pods", "Pods whose traffic the mesh captures.", value=len(enrolled)
        )
        yield GaugeMetricFamily(
            "ambimesh_pending_pods",
            "Pods the controller enrolled that this node has not captured yet.",
            value=len(self.agent.desired) - len(enrolled),
        )
        yield GaugeMetricFamily(
            "ambimesh_config_synced",
            "1 once the controller's config arrived.",
            value=int(self.agent.synced),
        )
        yield GaugeMetricFamily(
            "ambimesh_ztunnel_connected",
            "1 while ztunnel is connected.",
            value=int(self.agent.link.connected),
        )
        yield CounterMetricFamily(
            "ambimesh_agent_errors", "Failed enrollment attempts.", value=self.agent.errors
        )
        yield GaugeMetricFamily(
            "ambimesh_bpf_programs_attached",
            "eBPF programs and links of this agent the kernel reports in force.",
            value=self.agent.bpf.attached_programs(),
        )
        yield GaugeMetricFamily(
            "ambimesh_bpf_fast_path_loaded",
            "1 when the kernel accepted the same-node fast path's program, else 0 (ztunnel "
            "then relays same-node connections in user space).",
            value=int(self.agent.bpf.fast_path),
        )
        counters = self.agent.bpf.counters()
        for name, value in sorted(counters.items()):
            yield CounterMetricFamily(f"ambimesh_bpf_{name}", f"BPF counter {name}.", value=value)
