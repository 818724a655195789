"""What the lab end-to-end modules share: one running lab per module, bounded waits,
reading metrics and logs."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ambimesh.lab.lab import Lab, bundled_config_dir
from ambimesh.lab.netclient import connect_in
from tests.integration.privileged import require_privileged

WAIT_SECONDS = 30.0
# The bundled lab's waypoint layer: server-v2, waypoint demo/waypoint and the canary routes.
WAYPOINT_LAYER = "waypoint-canary.yaml"
# Two runs of one module (two engineers, or a run beside CI's) would tear down each other's
# lab of the same name: the second waits for the first, this long at most.
LAB_LOCK_WAIT_SECONDS = 900.0


@contextlib.contextmanager
def lab_name_lock(name: str) -> Iterator[None]:
    """Hold lab ``name`` for this process; fail naming the lab if another holds it too long."""
    with open(f"/run/lock/ambimesh-lab-{name}.lock", "w") as lock:
        deadline = time.monotonic() + LAB_LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"lab {name!r} is held by another test run for over "
                        f"{LAB_LOCK_WAIT_SECONDS:.0f} s (lock /run/lock/ambimesh-lab-{name}.lock)"
                    ) from None
                time.sleep(0.5)
        yield


@contextlib.contextmanager
def running_lab(
    name: str,
    examples: Sequence[str] = (),
    *,
    l4_only: bool = False,
    same_node_fast_path: bool = False,
) -> Iterator[Lab]:
    """A lab built for one test module and removed after it, also when the build fails.

    ``l4_only``: the bundled lab without its waypoint layer, so that Service server reaches
    demo/server directly (its use-waypoint label then names no Gateway: traffic goes direct,
    as in Istio) -- what the L4 modules assert about."""
    require_privileged()
    lab = Lab(name, same_node_fast_path=same_node_fast_path)
    with lab_name_lock(name):
        try:
            with tempfile.TemporaryDirectory(prefix=f"{name}-config-") as tmp:
                config = None
                if l4_only:
                    config = Path(tmp)
                    for path in bundled_config_dir().glob("*.yaml"):
                        if path.name != WAYPOINT_LAYER:
                            shutil.copy(path, config / path.name)
                lab.up(config, examples=examples)
            yield lab
        finally:
            lab.down(quiet=True)


def accepts(netns: str, port: int) -> bool:
    """Something in ``netns`` listens on its loopback ``port``."""
    try:
        connect_in(netns, "127.0.0.1", port, timeout=1.0).close()
    except OSError:
        return False
    return True


def write_config(path: Path, text: str) -> None:
    """Replace a file of the lab's live config whole: the controller must never read half
    a file (a truncated one can parse, minus some objects); it skips dotfiles."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(text)
    partial.replace(path)


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
