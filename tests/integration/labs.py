"""What the lab end-to-end modules share: one running lab per module, bounded waits,
reading metrics and logs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ambimesh.lab.lab import Lab
from tests.integration.privileged import require_privileged

WAIT_SECONDS = 30.0


@contextlib.contextmanager
def running_lab(
    name: str, config: Path | None = None, examples: Sequence[str] = ()
) -> Iterator[Lab]:
    """A lab built for one test module and removed after it, also when the build fails."""
    require_privileged()
    lab = Lab(name)
    try:
        lab.up(config, examples=examples)
        yield lab
    finally:
        lab.down(quiet=True)


def wait_until(check: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")


def metric(lines: list[str], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in lines:
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def log_text(lab: Lab, name: str) -> str:
    return (lab.logs / f"{name}.log").read_text(errors="replace")


def logged(lab: Lab, name: str, *parts: str) -> bool:
    """Some line of the component's log has all of ``parts``."""
    return any(all(p in line for p in parts) for line in log_text(lab, name).splitlines())
