"""A proxy's interpreter settings for its event loop's latency: the startup heap frozen out
of the collector (mesh.proxy_process), and the admin view that shows it (``/runtime``);
the open-file limit raised for many connections.
That a started ztunnel has frozen its heap: tests/integration/test_lab_e2e.py."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from mesh.http_endpoints import runtime_routes, serve_in_thread, stop_serving

# In a fresh interpreter: freeze what a ztunnel imports, then count what a full
# collection still walks, and check that later garbage is still collected.
FREEZE_PROBE = """
import gc, json
import ztunnel.main
from mesh.proxy_process import freeze_startup_heap
frozen = freeze_startup_heap()
walked = len(gc.get_objects())
class Cycle:
    pass
c = Cycle(); c.me = c; del c
print(json.dumps({"frozen": frozen, "walked": walked, "collected": gc.collect()}))
"""


def test_startup_heap_leaves_the_collected_generations() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FREEZE_PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    probe = json.loads(out.stdout)
    assert probe["frozen"] > 10_000  # the imported modules, classes and functions
    assert probe["walked"] < probe["frozen"] / 20
    assert probe["collected"] >= 1  # what comes after is collected as before


def test_runtime_route_reports_the_collector_and_threads() -> None:
    server = serve_in_thread(("127.0.0.1", 0), runtime_routes())
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/runtime", timeout=5) as reply:
            body = json.loads(reply.read())
    finally:
        stop_serving(server)
    assert set(body["gc"]) == {"frozen_objects", "thresholds", "pending", "generations"}
    assert len(body["gc"]["generations"]) == 3
    assert body["switch_interval_seconds"] == sys.getswitchinterval()
    assert "MainThread" in body["threads"]


# In a child started with a soft limit of 256 open files: what the proxies call at startup.
NOFILE_PROBE = """
import json, resource
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
from mesh.proxy_process import raise_open_file_limit
before, after = raise_open_file_limit()
print(json.dumps({"before": before, "after": after, "hard": hard,
                  "now": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}))
"""


def test_open_file_soft_limit_is_raised_to_the_hard_one() -> None:
    out = subprocess.run(
        [sys.executable, "-c", NOFILE_PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    probe = json.loads(out.stdout)
    assert probe["before"] == 256
    assert probe["after"] == probe["now"] == probe["hard"] > 256
