"""One :15020 for a node whose ztunnel runs several workers: the supervisor asks every
worker for its samples and serves their sums, under the names and labels one process
would show (a dashboard cannot tell how many workers there are).

A worker that dies leaves its last reported counts behind (added to the supervisor's
retired `Totals`), so the node's counters never go down; what it counted after the last
scrape is lost with it, as are the connections it carried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

# JSON-able, as a worker sends it: [{"name", "type", "help", "samples": [[name, labels, value]]}]
Families = list[dict[str, Any]]
_SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def families_of(registry: CollectorRegistry) -> Families:
    return [
        {
            "name": metric.name,
            "type": metric.type,
            "help": metric.documentation,
            "samples": [[s.name, s.labels, s.value] for s in metric.samples],
        }
        for metric in registry.collect()
    ]


@dataclass
class _Family:
    type: str
    help: str
    samples: dict[_SampleKey, float] = field(default_factory=dict)


@dataclass
class Totals:
    """Samples summed by name and label set, family by family."""

    families: dict[str, _Family] = field(default_factory=dict)

    def add(self, families: Families) -> None:
        for family in families:
            into = self.families.setdefault(
                str(family["name"]), _Family(str(family["type"]), str(family["help"]))
            )
            for name, labels, value in family["samples"]:
                key = (str(name), tuple(sorted((str(k), str(v)) for k, v in labels.items())))
                into.samples[key] = into.samples.get(key, 0.0) + float(value)

    def copy(self) -> Totals:
        return Totals(
            {n: _Family(f.type, f.help, dict(f.samples)) for n, f in self.families.items()}
        )

    def metrics(self) -> Iterator[Metric]:
        for name, family in sorted(self.families.items()):
            metric = Metric(name, family.help, family.type)
            for (sample, labels), value in sorted(family.samples.items()):
                metric.add_sample(sample, dict(labels), value)
            yield metric


class WorkersCollector(Collector):
    """Runs on the metrics server's thread; ``scrape`` returns the node's totals."""

    def __init__(self, scrape: Callable[[], Totals]) -> None:
        self._scrape = scrape

    def collect(self) -> Iterator[Metric]:
        return self._scrape().metrics()
