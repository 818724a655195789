"""Endpoint picking and outlier ejection (waypoint/balancer.py) with a fake clock and a
seeded RNG: round robin order, P2C against active counts, ejection and its end at interval
sweeps, the ejection cap and the panic threshold."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mesh.api import mesh_pb2
from waypoint.balancer import Balancer, OutlierDetector

ENDPOINTS = ["a", "b", "c", "d"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_cycles_in_order_from_a_random_start() -> None:
    balancer: Balancer[str] = Balancer(mesh_pb2.ROUND_ROBIN, random.Random(7))
    picks = [balancer.pick(ENDPOINTS) for _ in range(8)]
    start = ENDPOINTS.index(picks[0] or "")
    assert picks == [ENDPOINTS[(start + i) % 4] for i in range(8)]


def test_round_robin_starts_differ_between_replicas() -> None:
    replicas: list[Balancer[str]] = [
        Balancer(mesh_pb2.ROUND_ROBIN, random.Random(s)) for s in range(20)
    ]
    starts = {replica.pick(ENDPOINTS) for replica in replicas}
    assert len(starts) > 1


@pytest.mark.parametrize("policy", [mesh_pb2.ROUND_ROBIN, mesh_pb2.RANDOM, mesh_pb2.LEAST_REQUEST])
def test_exclude_avoids_tried_hosts_unless_none_left(
    policy: mesh_pb2.LoadBalancer.ValueType,
) -> None:
    balancer: Balancer[str] = Balancer(policy, random.Random(1))
    for _ in range(50):
        assert balancer.pick(ENDPOINTS, exclude={"a", "b", "c"}) == "d"
    assert balancer.pick(["a"], exclude={"a"}) == "a"
    assert balancer.pick([], exclude={"a"}) is None
    assert balancer.pick([]) is None


def test_random_is_roughly_uniform() -> None:
    balancer: Balancer[str] = Balancer(mesh_pb2.RANDOM, random.Random(3))
    counts = Counter(balancer.pick(ENDPOINTS) for _ in range(4000))
    assert all(800 < counts[e] < 1200 for e in ENDPOINTS)


def test_least_request_prefers_fewer_active_requests() -> None:
    balancer: Balancer[str] = Balancer(mesh_pb2.LEAST_REQUEST, random.Random(5))
    for _ in range(10):
        balancer.started("a")
    for _ in range(3):
        balancer.started("b")
    counts = Counter(balancer.pick(["a", "b", "c"]) for _ in range(9000))
    # P2C with replacement: a host wins when both draws are it, or it is drawn with a busier
    # one. With a=10, b=3, c=0 active: c wins 5/9, b 3/9, a only when drawn twice (1/9).
    assert counts["c"] == pytest.approx(5000, rel=0.06)
    assert counts["b"] == pytest.approx(3000, rel=0.08)
    assert counts["a"] == pytest.approx(1000, rel=0.15)


def test_least_request_with_equal_load_is_uniform() -> None:
    balancer: Balancer[str] = Balancer(mesh_pb2.LEAST_REQUEST, random.Random(11))
    counts = Counter(balancer.pick(ENDPOINTS) for _ in range(4000))
    assert all(800 < counts[e] < 1200 for e in ENDPOINTS)


def test_started_finished_track_active_requests() -> None:
    balancer: Balancer[str] = Balancer(mesh_pb2.LEAST_REQUEST)
    balancer.started("a")
    balancer.started("a")
    balancer.finished("a")
    assert balancer.active("a") == 1
    balancer.finished("a")
    balancer.finished("a")  # an unmatched finish never goes negative
    assert balancer.active("a") == 0


def detector(clock: Clock, **fields: float) -> OutlierDetector[str]:
    return OutlierDetector(mesh_pb2.OutlierDetection(**fields), clock)  # type: ignore[arg-type]


def test_consecutive_5xx_ejects_at_threshold_and_a_success_resets() -> None:
    clock = Clock()
    od = detector(clock, max_ejection_percent=100)
    od.healthy(ENDPOINTS)
    for _ in range(4):
        od.record("a", 500, False)
    od.record("a", 200, False)
    for _ in range(4):
        od.record("a", 503, False)
    assert not od.ejected("a")
    od.record("a", None, True)  # a connect failure counts as a 5xx
    assert od.ejected("a")
    assert od.healthy(ENDPOINTS) == ["b", "c", "d"]


def test_4xx_is_not_an_error() -> None:
    od = detector(Clock(), consecutive_5xx_errors=2, max_ejection_percent=100)
    for _ in range(10):
        od.record("a", 404, False)
    assert not od.ejected("a")


def test_gateway_errors_only_count_when_configured() -> None:
    od = detector(Clock(), consecutive_5xx_errors=100, consecutive_gateway_errors=3)
    od.healthy(["a"])
    od.record("a", 502, False)
    od.record("a", 500, False)  # a 5xx that is not a gateway error resets that count
    od.record("a", 504, False)
    od.record("a", None, True)
    assert not od.ejected("a")
    od.record("a", 503, False)
    assert od.ejected("a")


def test_ejection_ends_at_the_first_sweep_after_base_times_ejections() -> None:
    clock = Clock()
    od = detector(clock, consecutive_5xx_errors=1, max_ejection_percent=100)
    od.healthy(ENDPOINTS)
    clock.now += 5  # sweeps run at 1010, 1020, ...
    od.record("a", 500, False)  # ejected at 1005 for 30 s
    clock.now = 1034.9
    assert od.ejected("a")
    clock.now = 1040.0  # the 1040 sweep is the first at or after 1035
    assert not od.ejected("a")
    od.record("a", 500, False)  # second ejection at 1040: 60 s
    clock.now = 1099.0
    assert od.ejected("a")
    clock.now = 1100.0
    assert not od.ejected("a")


def test_backoff_decreases_while_healthy() -> None:
    clock = Clock()
    od = detector(clock, consecutive_5xx_errors=1, max_ejection_percent=100)
    od.healthy(ENDPOINTS)
    od.record("a", 500, False)  # 1000: 30 s, unejected at the 1030 sweep
    clock.now = 1030.0
    od.record("a", 500, False)  # backoff 2: 60 s, unejected at 1090
    clock.now = 1090.0
    assert not od.ejected("a")
    clock.now = 1500.0  # forty healthy sweeps: the backoff is back to zero
    od.record("a", 500, False)
    clock.now = 1530.0
    assert not od.ejected("a")


def test_max_ejection_is_capped_at_300_seconds() -> None:
    clock = Clock()
    od = detector(clock, consecutive_5xx_errors=1, base_ejection_seconds=200)
    od.healthy(["a"])
    od.record("a", 500, False)
    clock.now += 200
    od.record("a", 500, False)  # 400 s would be over the 300 s cap
    clock.now += 299
    assert od.ejected("a")
    clock.now += 10
    assert not od.ejected("a")


@pytest.mark.parametrize(
    ("hosts", "max_percent", "ejectable"),
    [
        (3, 0, 1),  # default 10%: the first ejection always happens
        (10, 0, 1),
        (20, 0, 2),
        (10, 30, 3),
        (4, 50, 2),
        (4, 100, 4),
    ],
)
def test_max_ejection_percent(hosts: int, max_percent: int, ejectable: int) -> None:
    names = [f"e{i}" for i in range(hosts)]
    od = detector(Clock(), consecutive_5xx_errors=1, max_ejection_percent=max_percent)
    od.healthy(names)
    for name in names:
        od.record(name, 503, False)
    assert sum(od.ejected(n) for n in names) == ejectable
    assert len(od.healthy(names)) == hosts - ejectable


def test_panic_threshold_routes_to_all_when_too_few_are_healthy() -> None:
    config = mesh_pb2.OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100)
    od: OutlierDetector[str] = OutlierDetector(config, Clock(), panic_threshold_percent=50)
    od.healthy(ENDPOINTS)
    od.record("a", 500, False)
    od.record("b", 500, False)
    assert od.healthy(ENDPOINTS) == ["c", "d"]  # 50% healthy: not below the threshold
    od.record("c", 500, False)
    assert od.healthy(ENDPOINTS) == ENDPOINTS


def test_istio_default_has_no_panic_mode() -> None:
    od = detector(Clock(), consecutive_5xx_errors=1, max_ejection_percent=100)
    od.healthy(["a"])
    od.record("a", 500, False)
    assert od.healthy(["a"]) == []


def test_disabled_without_config() -> None:
    od: OutlierDetector[str] = OutlierDetector(None, Clock())
    for _ in range(100):
        od.record("a", 500, False)
    assert not od.ejected("a")
    assert od.healthy(["a"]) == ["a"]


def test_removed_endpoints_are_forgotten() -> None:
    od = detector(Clock(), consecutive_5xx_errors=1, max_ejection_percent=100)
    od.healthy(ENDPOINTS)
    od.record("a", 500, False)
    assert od.healthy(["b", "c"]) == ["b", "c"]
    assert not od.ejected("a")
