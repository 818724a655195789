"""The waypoint in the default lab, with real processes only: the client pod's calls to
Service server are captured by eBPF, tunneled by ztunnel as HBONE to waypoint demo/waypoint,
routed there by the seed's VirtualService and DestinationRule (and the changes each test
makes to them in the lab's live YAML directory) and sent over HBONE to demo/server (v1) or
demo/server-v2; the demo app's knobs (`?fail=`, `?delay=`, `?pod=`) make backends misbehave.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambimesh.lab import cgroups
from ambimesh.lab.capture import fabric_capture
from ambimesh.lab.demo import CANARY_WAYPOINT, istio_metrics, waypoint_metrics
from ambimesh.lab.demo import run as run_demo
from ambimesh.lab.lab import Lab
from ambimesh.lab.netclient import http_get
from tests.integration.labs import (
    WAYPOINT_LAYER,
    log_text,
    logged,
    metric,
    running_lab,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.privileged

LAB_NAME = "amwp"
WAYPOINT_SA = "spiffe://cluster.local/ns/demo/sa/waypoint"
CLIENT_SA = "spiffe://cluster.local/ns/demo/sa/client"
V1, V2 = "server", "server-v2"
ADMIN_PORT = 15000

# Run in demo/client: `calls` GETs of `url` ("{i}" becomes the call's number) on `workers`
# threads, one connection each; prints [[status, answering pod or reply text], ...].
CALLER = """
import concurrent.futures, http.client, json, sys, urllib.parse
url, calls, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
headers = json.loads(sys.argv[4])
def one(i):
    u = urllib.parse.urlsplit(url.replace("{i}", str(i)))
    try:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=60)
        conn.request("GET", u.path + ("?" + u.query if u.query else ""), headers=headers)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        try:
            who = json.loads(body)["pod"]
        except (ValueError, KeyError, TypeError):
            who = body.decode(errors="replace").strip()[:100]
        return [response.status, who]
    except Exception as exc:
        return [0, repr(exc)]
with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    print(json.dumps(list(pool.map(one, range(calls)))))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(LAB_NAME) as built:
        yield built


def calls(
    lab: Lab, url: str, count: int, workers: int = 1, headers: dict[str, str] | None = None
) -> list[tuple[int, str]]:
    argv = ["python", "-c", CALLER, url, str(count), str(workers), json.dumps(headers or {})]
    result = lab.run("demo/client", argv, timeout=300)
    assert result.returncode == 0, result.stderr
    return [(status, who) for status, who in json.loads(result.stdout)]


def admin_dump(lab: Lab) -> dict[str, Any]:
    """The waypoint's config_dump (its admin port answers on the pod's loopback only)."""
    _, body = http_get(
        lab.load_plan().pod(CANARY_WAYPOINT).netns, "127.0.0.1", ADMIN_PORT, "/config_dump"
    )
    dump: dict[str, Any] = json.loads(body)
    return dump


@contextlib.contextmanager
def pushed(lab: Lab, path: Path, text: str | None) -> Iterator[None]:
    """``path`` holds ``text`` (None: is removed) until the waypoint has it; restored after."""
    original = path.read_text() if path.exists() else None

    def put(content: str | None) -> None:
        version = admin_dump(lab)["version"]
        if content is None:
            path.unlink(missing_ok=True)
        else:
            write_config(path, content)
        wait_until(
            lambda: admin_dump(lab)["version"] != version, f"the waypoint to take {path.name}"
        )

    put(text)
    try:
        yield
    finally:
        put(original)


@contextlib.contextmanager
def canary_changed(
    lab: Lab, change: Callable[[dict[str, Any], dict[str, Any]], None]
) -> Iterator[None]:
    """The lab's VirtualService and DestinationRule for server, as ``change`` edits them."""
    path = lab.config_dir / WAYPOINT_LAYER
    docs = list(yaml.safe_load_all(path.read_text()))
    (vs,) = [d for d in docs if d["kind"] == "VirtualService"]
    (dr,) = [d for d in docs if d["kind"] == "DestinationRule"]
    change(vs["spec"], dr["spec"])
    with pushed(lab, path, yaml.safe_dump_all(docs, sort_keys=False)):
        yield


def to_subset(subset: str, weight: int | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {"destination": {"host": "server", "subset": subset}}
    if weight is not None:
        route["weight"] = weight
    return route


def pods_of(results: list[tuple[int, str]]) -> dict[str, int]:
    """How many calls each pod answered with 200."""
    return dict(collections.Counter(who for status, who in results if status == 200))


def test_the_demo_shows_the_canary_split_and_the_waypoint_metrics(
    lab: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_demo(lab) == 0
    out = capsys.readouterr().out
    assert "no plaintext of the request" in out
    # The first call lands on v1 or, one time in ten, on v2: the proof names the one it hit.
    assert re.search(f"authenticated the caller of demo/server(-v2)? as: {WAYPOINT_SA}", out), out
    assert f"  {V1}: " in out and "istio_requests_total{" in out


def test_the_waypoint_froze_its_startup_heap(lab: Lab) -> None:
    """As ztunnel: a full collection in a serving waypoint never walks what it loaded."""
    netns = lab.load_plan().pod(CANARY_WAYPOINT).netns
    status, body = http_get(netns, "127.0.0.1", ADMIN_PORT, "/runtime")
    assert status == 200
    assert json.loads(body)["gc"]["frozen_objects"] > 10_000


def test_the_canary_splits_90_10_over_2000_calls(lab: Lab, tmp_path: Path) -> None:
    plan = lab.load_plan()
    with fabric_capture(plan, "node-1", tmp_path / "fabric.pcap") as captured:
        results = calls(lab, "http://server/split-{i}", 2000, workers=8)
    assert {status for status, _ in results} == {200}, pods_of(results)
    seen = pods_of(results)
    assert set(seen) == {V1, V2}
    share = seen[V1] / len(results)
    # Binomial(2000, 0.9): sd 0.0067; 87-93 % is 4.5 sd; 50/50 or 100/0 fall far outside.
    assert 0.87 <= share <= 0.93, f"v1 answered {share:.1%}: {seen}"
    assert 15008 in captured[0].ports() and 8080 not in captured[0].ports()

    lines = waypoint_metrics(lab, CANARY_WAYPOINT)
    assert (
        metric(lines, "istio_requests_total", source_principal=CLIENT_SA, response_code="200")
        >= 2000
    )
    # The subset pods' ztunnels saw the waypoint, not the client, as their peer.
    zt = istio_metrics(lab, plan.pod("demo/server").node)
    assert (
        metric(
            zt,
            "istio_tcp_connections_opened_total",
            reporter="destination",
            source_principal=WAYPOINT_SA,
            destination_workload=V1,
        )
        >= 1
    )


def test_header_routing_sends_marked_calls_to_v2(lab: Lab) -> None:
    def change(vs: dict[str, Any], dr: dict[str, Any]) -> None:
        marked = {
            "match": [{"headers": {"x-version": {"exact": "v2"}}}],
            "route": [to_subset("v2")],
        }
        vs["http"].insert(0, marked)

    with canary_changed(lab, change):
        marked = calls(lab, "http://server/marked-{i}", 30, headers={"x-version": "v2"})
        assert marked == [(200, V2)] * 30
        assert V1 in pods_of(calls(lab, "http://server/plain-{i}", 30))


def test_retries_hide_a_backend_failing_30_percent(lab: Lab) -> None:
    before = calls(lab, "http://server/flaky-{i}?fail=0.3", 100)
    failed = sum(1 for status, _ in before if status == 503)
    assert 20 <= failed <= 40, f"the knob fails ~30 % without retries: {failed}"

    def change(vs: dict[str, Any], dr: dict[str, Any]) -> None:
        vs["http"][0]["retries"] = {"attempts": 3, "retryOn": "5xx"}

    with canary_changed(lab, change):
        results = calls(lab, "http://server/retried-{i}?fail=0.3", 300)
    ok = sum(1 for status, _ in results if status == 200)
    assert ok >= 0.99 * len(results), f"{ok} of {len(results)} succeeded"


def upstream_attempts(lab: Lab, tag: str) -> int:
    """Requests for paths with ``tag`` that the two server pods logged."""
    return sum(log_text(lab, f"pod-demo-{pod}").count(f"/{tag}-") for pod in (V1, V2))


def test_the_retry_budget_caps_amplification_in_an_outage(lab: Lab) -> None:
    def change(vs: dict[str, Any], dr: dict[str, Any]) -> None:
        vs["http"][0]["retries"] = {"attempts": 3, "retryOn": "5xx"}

    with canary_changed(lab, change):
        # One call at a time: the budget's floor (3 retries in flight) lets every retry go.
        alone = calls(lab, "http://server/alone-{i}?fail=1", 20)
        # 40 at once: at most 20 % of the active requests may be retries.
        crowd = calls(lab, "http://server/crowd-{i}?fail=1", 400, workers=40)
    assert {s for s, _ in alone + crowd} == {503}
    wait_until(lambda: upstream_attempts(lab, "alone") >= 80, "the backends to log every attempt")
    assert upstream_attempts(lab, "alone") == 20 * 4
    amplification = upstream_attempts(lab, "crowd") / len(crowd)
    assert amplification < 2.0, f"{amplification:.2f} attempts per call"


def test_outlier_detection_ejects_a_failing_endpoint_and_readmits_it(lab: Lab) -> None:
    def change(vs: dict[str, Any], dr: dict[str, Any]) -> None:
        vs["http"] = [{"route": [{"destination": {"host": "server"}}]}]
        dr["trafficPolicy"] = {
            "loadBalancer": {"simple": "ROUND_ROBIN"},
            "outlierDetection": {
                "consecutive5xxErrors": 3,
                "interval": "1s",
                "baseEjectionTime": "15s",
                "maxEjectionPercent": 100,
            },
        }

    with canary_changed(lab, change):
        failing = calls(lab, f"http://server/eject-{{i}}?fail=1&pod={V2}", 40)
        assert failing[:6].count((503, V2)) >= 1, failing[:6]
        assert failing[-30:] == [(200, V1)] * 30, "server-v2 was not ejected"
        # Healthy again, but ejected for baseEjectionTime: still nothing for it.
        assert calls(lab, "http://server/ejected-{i}", 10) == [(200, V1)] * 10
        wait_until(
            lambda: V2 in pods_of(calls(lab, "http://server/back-{i}", 10)),
            "server-v2 to be readmitted",
            seconds=60,
        )


def test_beyond_the_rate_limit_calls_get_429(lab: Lab) -> None:
    limit = {
        "apiVersion": "ambimesh.io/v1alpha1",
        "kind": "RateLimit",
        "metadata": {"name": "server", "namespace": "demo"},
        "spec": {"targetRef": {"kind": "Service", "name": "server"}, "requests": 5, "per": "1h"},
    }
    with pushed(lab, lab.config_dir / "ratelimit-e2e.yaml", yaml.safe_dump(limit)):
        results = calls(lab, "http://server/limited-{i}", 12)
    statuses = [status for status, _ in results]
    assert statuses == [200] * 5 + [429] * 7, statuses
    lines = waypoint_metrics(lab, CANARY_WAYPOINT)
    assert metric(lines, "istio_requests_total", response_code="429", response_flags="RL") >= 7


def test_a_slow_backend_meets_the_route_timeout_with_504(lab: Lab) -> None:
    def change(vs: dict[str, Any], dr: dict[str, Any]) -> None:
        vs["http"][0]["timeout"] = "1s"

    with canary_changed(lab, change):
        slow = calls(lab, "http://server/slow-{i}?delay=2", 4, workers=4)
        fast = calls(lab, "http://server/fast-{i}", 10)
    assert [status for status, _ in slow] == [504] * 4, slow
    assert {who for _, who in slow} == {"upstream request timeout"}
    assert {status for status, _ in fast} == {200}
    lines = waypoint_metrics(lab, CANARY_WAYPOINT)
    assert metric(lines, "istio_requests_total", response_code="504", response_flags="UT") >= 4


def test_an_l7_deny_answers_403_names_the_policy_and_cannot_be_bypassed(lab: Lab) -> None:
    v1 = lab.load_plan().pod("demo/server")
    direct = f"http://{v1.address}:8080/direct-{{i}}"
    assert calls(lab, direct, 1) == [(200, V1)], "without L7 policy the pod is reachable"
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-admin", "namespace": "demo"},
        "spec": {
            "targetRefs": [{"kind": "Service", "group": "", "name": "server"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
        },
    }
    with pushed(lab, lab.config_dir / "l7-deny-e2e.yaml", yaml.safe_dump(policy)):
        assert calls(lab, "http://server/admin/x-{i}", 3) == [(403, "RBAC: access denied")] * 3
        assert {s for s, _ in calls(lab, "http://server/fine-{i}", 3)} == {200}
        # The Service is protected at L7, so its pods take traffic only from the waypoint.
        wait_until(lambda: calls(lab, direct, 1)[0][0] == 0, "direct calls to be refused")
    wait_until(lambda: calls(lab, direct, 1)[0][0] == 200, "the pod to be reachable again")
    denied = [
        json.loads(line[line.index("{") :])
        for line in log_text(lab, "pod-demo-waypoint").splitlines()
        if '"path":"/admin/x-0"' in line
    ]
    assert denied and denied[-1]["response_code"] == 403
    assert denied[-1]["response_code_details"] == "rbac_access_denied_matched_policy[demo/no-admin]"


GRPC_SERVER = """
import sys
from concurrent import futures
import grpc
pod = sys.argv[1].encode()
def hello(request, context):
    return b"hello " + request + b" from " + pod
handler = grpc.method_handlers_generic_handler(
    "demo.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(hello)}
)
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port("0.0.0.0:9090")
server.start()
print("serving", flush=True)
server.wait_for_termination(timeout=300)
"""
GRPC_CLIENT = """
import os
os.environ["GRPC_DNS_RESOLVER"] = "native"  # the pod's /etc/hosts names the Service
import grpc
with grpc.insecure_channel("server:9090") as channel:
    grpc.channel_ready_future(channel).result(timeout=30)
    hello = channel.unary_unary("/demo.Greeter/Hello")
    for i in range(10):
        print(hello(b"mesh", timeout=30).decode())
"""


def test_a_grpc_call_routes_through_the_waypoint(lab: Lab) -> None:
    servers = [
        lab.spawn_in_pod(f"demo/{pod}", ["python", "-c", GRPC_SERVER, pod], capture=True)
        for pod in (V1, V2)
    ]
    try:
        for server in servers:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == b"serving"
        result = lab.run("demo/client", ["python", "-c", GRPC_CLIENT], timeout=120)
        assert result.returncode == 0, result.stderr
        answers = result.stdout.split("\n")[:-1]
        assert len(answers) == 10
        assert {a.rsplit(" ", 1)[1] for a in answers} <= {V1, V2}
        assert all(a.startswith("hello mesh from ") for a in answers)
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=10)
    lines = waypoint_metrics(lab, CANARY_WAYPOINT)
    assert (
        metric(lines, "istio_requests_total", request_protocol="grpc", grpc_response_status="0")
        >= 10
    )


UPLOAD = """
import http.client, json, sys
size, chunk = int(sys.argv[1]), b"\\0" * (1 << 20)
def body():
    for _ in range(size // len(chunk)):
        yield chunk
conn = http.client.HTTPConnection("server", 80, timeout=300)
conn.request("POST", "/upload", body=body(), headers={"Content-Length": str(size)})
response = conn.getresponse()
print(response.status, json.loads(response.read())["body_bytes"])
"""
GiB = 1 << 30
MiB = 1 << 20


def waypoint_pid(lab: Lab) -> int:
    pod = lab.load_plan().pod(CANARY_WAYPOINT)
    procs = (cgroups.pod_cgroup(lab.name, pod.node, pod.uid) / "cgroup.procs").read_text().split()
    (pid,) = [int(p) for p in procs if b"waypoint" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return pid


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_1gib_upload_streams_through_with_the_waypoint_rss_bounded(lab: Lab) -> None:
    pid = waypoint_pid(lab)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kib(pid, "VmRSS") * 1024
    result = lab.run("demo/client", ["python", "-c", UPLOAD, str(GiB)], timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["200", str(GiB)]
    peak = status_kib(pid, "VmHWM") * 1024
    assert peak - before < 64 * MiB, f"the waypoint grew by {(peak - before) // MiB} MiB"


# Run in demo/client: a client stalls in its head while others call; then one malformed
# and one oversized request. Prints {"stalled": ..., "others": [...], ...}.
ABUSE = """
import http.client, json, socket
def raw(data, wait=30):
    s = socket.create_connection(("server", 80), timeout=wait)
    s.sendall(data)
    answer = b""
    while chunk := s.recv(65536):
        answer += chunk
    s.close()
    return answer.split(b"\\r\\n", 1)[0].decode()
HEAD = b"GET / HTTP/1.1\\r\\nHost: server\\r\\n"
stalled = socket.create_connection(("server", 80), timeout=60)
stalled.sendall(b"GET /stalled HTTP/1.1\\r\\nHost: server\\r\\nX-Half: ")
others = []
for i in range(20):
    conn = http.client.HTTPConnection("server", 80, timeout=30)
    conn.request("GET", f"/bystander-{i}")
    others.append(conn.getresponse().status)
    conn.close()
answer = b""
while chunk := stalled.recv(65536):
    answer += chunk
print(json.dumps({
    "stalled": answer.split(b"\\r\\n", 1)[0].decode(),
    "others": others,
    "malformed": raw(HEAD + b"No colon here\\r\\n\\r\\n"),
    "oversized": raw(HEAD + b"X-Big: " + b"a" * 70000 + b"\\r\\n\\r\\n"),
}))
"""


def test_malformed_oversized_and_stalled_requests_are_refused_without_disturbing_others(
    lab: Lab,
) -> None:
    result = lab.run("demo/client", ["python", "-c", ABUSE], timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["others"] == [200] * 20
    assert seen["stalled"].startswith("HTTP/1.1 408 ")
    assert seen["malformed"].startswith("HTTP/1.1 400 ")
    assert seen["oversized"].startswith("HTTP/1.1 431 ")
    assert {s for s, _ in calls(lab, "http://server/after-abuse-{i}", 5)} == {200}


def test_an_invalid_route_is_rejected_with_its_location_and_the_last_good_stays(lab: Lab) -> None:
    path = lab.config_dir / WAYPOINT_LAYER
    original = path.read_text()
    docs = list(yaml.safe_load_all(original))
    (vs,) = [d for d in docs if d["kind"] == "VirtualService"]
    vs["spec"]["http"][0]["timeout"] = "soon"
    routes_before = admin_dump(lab)["http_routes"]
    try:
        write_config(path, yaml.safe_dump_all(docs, sort_keys=False))
        wait_until(
            lambda: logged(lab, "controller", WAYPOINT_LAYER, "spec.http[0].timeout", "soon"),
            "the controller to reject the route, naming file and field",
        )
        assert admin_dump(lab)["http_routes"] == routes_before
        assert set(pods_of(calls(lab, "http://server/still-{i}", 60))) == {V1, V2}
    finally:
        write_config(path, original)


def test_a_route_change_applies_live(lab: Lab) -> None:
    """Nothing restarts: the waypoint takes the new weights from the next push."""

    def change(vs: dict[str, Any], dr: dict[str, Any]) -> None:
        vs["http"][0]["route"] = [to_subset("v1", 0), to_subset("v2", 100)]

    with canary_changed(lab, change):
        assert pods_of(calls(lab, "http://server/live-{i}", 20)) == {V2: 20}
    assert V1 in pods_of(calls(lab, "http://server/back-{i}", 20))
