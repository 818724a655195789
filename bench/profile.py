"""py-spy on both ztunnels while ambimesh carries a test's load: where their time goes.

py-spy samples the Python stacks of a running process from outside (no restart, no code
change). The profiles are written as collapsed stacks (``--format raw``: one
``frame;frame;... count`` line per stack), which speedscope and flamegraph.pl open, and
are summarised here by self time.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.parsers import LoopProfile, loop_profile
from bench.sampling import Proxy

RATE_HZ = 100  # --native unwinding falls behind at 250 Hz on this machine


def py_spy() -> Path:
    path = Path(sys.executable).parent / "py-spy"
    if not path.exists():
        raise FileNotFoundError("no py-spy: install the bench extra (pip install -e '.[bench]')")
    return path


def profile_during(
    proxies: tuple[Proxy, ...], seconds: int, out_dir: Path, name: str, load: Callable[[], object]
) -> dict[str, LoopProfile]:
    """Record every proxy for ``seconds`` + 1 while ``load()`` runs; the event loop's
    profile per side. py-spy pauses the process for each sample: what the load measures
    meanwhile is slower than in the table, and is not recorded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recorders = {}
    for proxy in proxies:
        out = out_dir / f"profile-{name}-{proxy.side}.txt"
        argv = [
            str(py_spy()), "record",
            "--pid", str(proxy.pid),
            "--duration", str(seconds + 1),
            "--rate", str(RATE_HZ),
            "--native",  # C frames too: OpenSSL, uvloop, the h2 parser's helpers
            "--format", "raw",
            "--output", str(out),
            *(["--subprocesses"] if proxy.others else []),  # a ztunnel's workers
        ]  # fmt: skip
        recorders[proxy.side] = (out, subprocess.Popen(argv, stdout=subprocess.DEVNULL))
    try:
        load()
    finally:
        for _, recorder in recorders.values():
            try:
                recorder.wait(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
    return {
        side: loop_profile(out.read_text() if out.exists() else "")
        for side, (out, _) in recorders.items()
    }
