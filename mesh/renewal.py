"""When to renew a workload certificate, and when to try again after a failed renewal.

Pure arithmetic on wall-clock seconds, so the schedule can be checked with any clock. The
CA being down must never cost a certificate: renewal starts at half-life, failures back
off exponentially (with jitter, so a node's identities and the nodes of a cluster do not
retry in lock-step against a controller that just came back), and the backoff is capped
by a quarter of the validity left, so tries get closer together as expiry nears and the
last one comes shortly before it, not a whole backoff period after.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RenewalPolicy:
    """``initial_backoff`` doubles per failed try up to ``max_backoff``, +-``jitter`` of it,
    never more than ``remaining / 4`` and never less than ``min_retry`` (no busy loop
    against a CA that refuses right away)."""

    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    min_retry: float = 0.5
    jitter: float = 0.2
    # Renewing more often than this is churn, whatever the certificate's lifetime.
    min_renew_interval: float = 1.0

    def renew_at(self, now: float, not_after: float) -> float:
        """When a certificate just obtained is renewed: half its remaining validity."""
        return now + max(self.min_renew_interval, (not_after - now) / 2)

    def retry_delay(self, failures: int, remaining: float, rand: float) -> float:
        """Seconds until the next try after ``failures`` (>= 1) failed tries in a row, with
        ``remaining`` seconds of validity left (negative once expired) and ``rand`` uniform
        in [0, 1). An expired certificate has nothing left to protect: plain backoff."""
        backoff = min(self.max_backoff, self.initial_backoff * 2.0 ** min(failures - 1, 64))
        backoff *= 1.0 + self.jitter * (2.0 * rand - 1.0)
        if remaining > 0:
            backoff = min(backoff, remaining / 4)
        return max(self.min_retry, backoff)
