"""mesh.renewal.RenewalPolicy on a fake clock: half-life, exponential backoff with jitter,
the cap by the validity left, and whole outages played against it (the CA down from the
renewal on, back at some moment): a try always comes before the certificate expires."""

from __future__ import annotations

import itertools
import random

import pytest

from mesh.renewal import RenewalPolicy

DEFAULT = RenewalPolicy()
NO_JITTER = RenewalPolicy(jitter=0.0)
MID = 0.5  # the rand value that means no jitter at all


def test_renewal_at_half_the_remaining_validity() -> None:
    assert DEFAULT.renew_at(now=1000.0, not_after=1000.0 + 86400) == 1000.0 + 43200
    assert DEFAULT.renew_at(now=1000.0, not_after=1040.0) == 1020.0
    # never more often than once a second, even for a certificate about to expire
    assert DEFAULT.renew_at(now=1000.0, not_after=1000.5) == 1001.0
    assert DEFAULT.renew_at(now=1000.0, not_after=900.0) == 1001.0


def test_backoff_doubles_from_one_second_up_to_a_minute() -> None:
    far = 86400.0
    delays = [NO_JITTER.retry_delay(n, far, MID) for n in range(1, 10)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert NO_JITTER.retry_delay(10_000, far, MID) == 60.0  # no overflow after days of failure


@pytest.mark.parametrize("failures", [1, 3, 7])
def test_jitter_spreads_tries_by_a_fifth_either_way(failures: int) -> None:
    base = NO_JITTER.retry_delay(failures, 86400.0, MID)
    assert DEFAULT.retry_delay(failures, 86400.0, MID) == pytest.approx(base)
    assert DEFAULT.retry_delay(failures, 86400.0, 0.0) == pytest.approx(base * 0.8)
    assert DEFAULT.retry_delay(failures, 86400.0, 0.999999) == pytest.approx(base * 1.2, rel=1e-5)


def test_backoff_never_sleeps_past_a_quarter_of_the_validity_left() -> None:
    assert NO_JITTER.retry_delay(7, remaining=100.0, rand=MID) == 25.0
    assert NO_JITTER.retry_delay(7, remaining=8.0, rand=MID) == 2.0
    assert NO_JITTER.retry_delay(1, remaining=8.0, rand=MID) == 1.0  # backoff was shorter


def test_no_busy_loop_near_expiry_or_after_it() -> None:
    assert NO_JITTER.retry_delay(5, remaining=1.0, rand=MID) == 0.5  # min_retry
    # expired: nothing left to protect, plain backoff (the CA may be down for long)
    assert NO_JITTER.retry_delay(1, remaining=-5.0, rand=MID) == 1.0
    assert NO_JITTER.retry_delay(9, remaining=-5.0, rand=MID) == 60.0


def tries_during_outage(
    policy: RenewalPolicy, issued: float, not_after: float, ca_back: float, rng: random.Random
) -> list[float]:
    """The CA refuses from the renewal time until ``ca_back``; the clock of every try,
    ending with the first one at or after ``ca_back`` (which succeeds)."""
    now = policy.renew_at(issued, not_after)
    tries = [now]
    failures = 0
    while now < ca_back:
        failures += 1
        now += policy.retry_delay(failures, not_after - now, rng.random())
        tries.append(now)
        assert len(tries) < 10_000, "the schedule does not advance"
    return tries


@pytest.mark.parametrize("seed", range(20))
def test_a_24h_certificate_survives_a_10_minute_outage_at_its_renewal(seed: int) -> None:
    rng = random.Random(seed)
    issued, not_after = 0.0, 86400.0
    renewal = DEFAULT.renew_at(issued, not_after)
    tries = tries_during_outage(DEFAULT, issued, not_after, renewal + 600, rng)
    # back within one maximal backoff of the CA's return, half a day before expiry
    assert tries[-1] <= renewal + 600 + 60 * 1.2
    # the failed tries back off: no hammering of the CA while it is down
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert all(gap >= 0.8 * min(2**n, 60) for n, gap in enumerate(gaps))
    assert len(tries) <= 20


@pytest.mark.parametrize("seed", range(10))
def test_whenever_the_ca_returns_before_expiry_a_try_follows_before_expiry(seed: int) -> None:
    """40 s certificate (as the outage test in the lab): whatever moment the CA comes back,
    the next try comes before the old certificate expires, unless the CA came back
    within min_retry of the expiry."""
    rng = random.Random(seed)
    issued, not_after = 0.0, 40.0
    for tenth in range(200, 395):  # back at 20.0 s ... 39.4 s
        ca_back = tenth / 10
        tries = tries_during_outage(DEFAULT, issued, not_after, ca_back, rng)
        assert tries[-1] < not_after, f"CA back at {ca_back}s: next try at {tries[-1]:.2f}s"
