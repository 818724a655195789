"""Hypothesis profiles for the fuzz targets: bounded and reproducible in CI, longer on demand.

``ci`` (the default) derandomizes, so every run explores the same inputs and a failure in
CI fails again locally, and keeps no example database, so nothing is written into the
checkout. ``AMBIMESH_FUZZ_EXAMPLES=N`` loads ``long``: N examples per target, fresh random
inputs every run, no deadline. A failure prints its ``@reproduce_failure`` blob either way.
Hypothesis' own caches go to the temp directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

ENV = "AMBIMESH_FUZZ_EXAMPLES"
CI_EXAMPLES = 200

# Hypothesis caches (constants, unicode tables) even without a database: not in the checkout.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ambimesh-hypothesis")

settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    derandomize=True,
    database=None,
    # Generous: a 2-core CI machine runs other suites beside us. Hangs are caught by each
    # target's own asyncio timeouts, not by this.
    deadline=5000,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get(ENV) or CI_EXAMPLES),
    derandomize=False,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("long" if os.environ.get(ENV) else "ci")


def examples(share: float) -> int:
    """This target's example count: ``share`` of the profile's (real connections cost more)."""
    assert settings.default is not None
    return max(1, round(settings.default.max_examples * share))
