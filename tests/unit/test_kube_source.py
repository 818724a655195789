"""The controller's Kubernetes source against the stand-in API server (real HTTP, real
kubernetes-asyncio client, the API's JSON shapes): the translated snapshot follows list
and watch, across bookmarks, dropped connections and 410 Gone, with no event lost or
applied twice."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from controller.sources.kubernetes import KubernetesSource
from controller.sources.kubernetes_api import KubeApi
from controller.sources.kubernetes_watch import Backoff, Kind, Reflector
from controller.store import Store
from controller.translate import SourcedObject, translate
from mesh.api import mesh_pb2
from tests.kube_standin import objects as k
from tests.kube_standin.cluster import standin, until
from tests.kube_standin.server import StandinApi, WatchRecord


class Controller:
    """What main wires: the source feeding translate() into a Store."""

    def __init__(self, api: KubeApi, **reflector: float | int | tuple[int, int]) -> None:
        self.store = Store()
        self.applies = 0

        def make(api: KubeApi, kind: Kind, on_change: Callable[[], None]) -> Reflector:
            backoff = Backoff(base=0.02, cap=0.2, rng=random.Random(7))
            options = {"watch_seconds": (30, 30), "absent_retry": 0.1, **reflector}
            return Reflector(api, kind, on_change, backoff, **options)  # type: ignore[arg-type]

        self.source = KubernetesSource(api, self.apply, debounce=0.05, reflector=make)

    def apply(self, objects: list[SourcedObject]) -> None:
        self.applies += 1
        self.store.replace(translate(objects, None, self.store.current.resources))

    def workload(self, ns: str, name: str) -> mesh_pb2.Workload | None:
        resource = self.store.current.resources.get(f"workload/{ns}/{name}")
        return resource.workload if resource is not None else None

    def service(self, ns: str, name: str) -> mesh_pb2.Service | None:
        resource = self.store.current.resources.get(f"service/{ns}/{name}")
        return resource.service if resource is not None else None

    def reflector(self, plural: str) -> Reflector:
        return next(r for r in self.source.reflectors if r.kind.plural == plural)


@asynccontextmanager
async def running(
    tmp_path: Path,
    seed: Iterable[k.JsonObject] = (),
    skip: Iterable[str] = (),
    **reflector: float | int | tuple[int, int],
) -> AsyncIterator[tuple[StandinApi, Controller]]:
    async with standin(tmp_path, skip) as (server, api):
        for obj in seed:
            server.put(obj)
        controller = Controller(api, **reflector)
        task = asyncio.create_task(controller.source.run())
        try:
            await asyncio.wait_for(controller.source.applied.wait(), 5)
            yield server, controller
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def demo_cluster(ambient: bool = True) -> list[k.JsonObject]:
    return [
        k.namespace("demo", k.AMBIENT if ambient else None),
        k.node("node-1"),
        k.pod("demo", "server", "10.0.0.2", labels={"app": "server"}),
        k.pod("demo", "client", "10.0.0.3", labels={"app": "client"}),
        k.service("demo", "server", "10.96.0.10", {"app": "server"}),
    ]


def watches(server: StandinApi, plural: str) -> list[WatchRecord]:
    return [w for w in server.watches if w.plural == plural]


def assert_exactly_once(server: StandinApi, plural: str, after: int) -> None:
    """Across all watches of ``plural``, every event after ``after`` was sent exactly once,
    in order: each watch resumed where the last whole event left it."""
    sent = [rv for w in watches(server, plural) for rv in w.sent]
    assert sent == [e.rv for e in server.events(plural) if e.rv > after]


async def test_initial_list_is_translated(tmp_path: Path) -> None:
    async with running(tmp_path, demo_cluster()) as (server, controller):
        server_pod = controller.workload("demo", "server")
        assert server_pod is not None and server_pod.ambient
        assert list(server_pod.addresses) == ["10.0.0.2"] and server_pod.node == "node-1"
        service = controller.service("demo", "server")
        assert service is not None and list(service.endpoint_uids) == [server_pod.uid]
        assert [(p.port, p.target_port) for p in service.ports] == [(80, 8080)]
        # The uid is the API server's, not one made up from the name.
        assert (
            server_pod.uid
            == server.collections[("v1", "pods")].objects[("demo", "server")]["metadata"]["uid"]
        )
        # Core list items carry no apiVersion/kind: the source adds them.
        assert ("GET", "/api/v1/pods", {"limit": "500"}) in server.requests


async def test_relabeling_a_namespace_enrolls_its_pods_in_one_translation(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, demo_cluster(ambient=False)) as (server, controller):
        assert not controller.workload("demo", "server").ambient  # type: ignore[union-attr]
        before, version = controller.applies, controller.store.current.serial
        # kubectl label ns demo ambimesh.io/dataplane-mode=ambient
        server.put(k.namespace("demo", k.AMBIENT))
        await until(lambda: controller.store.current.serial > version)
        assert controller.workload("demo", "server").ambient  # type: ignore[union-attr]
        assert controller.workload("demo", "client").ambient  # type: ignore[union-attr]
        assert controller.applies == before + 1
        # A burst of changes (a rollout) is debounced into one translation.
        before = controller.applies
        for i in range(20):
            server.put(k.pod("demo", f"web-{i}", f"10.0.1.{i + 1}"))
        await until(lambda: controller.workload("demo", "web-19") is not None)
        await asyncio.sleep(0.2)
        assert controller.applies - before <= 2
        server.delete("v1", "pods", "demo", "client")
        await until(lambda: controller.workload("demo", "client") is None)


async def test_bookmarks_advance_the_resource_version(tmp_path: Path) -> None:
    async with running(tmp_path, demo_cluster(), watch_seconds=(1, 1)) as (server, controller):
        pods = controller.reflector("pods")
        listed = pods.resource_version
        server.put(k.namespace("other"))  # moves the global resourceVersion, not pods'
        server.put(k.namespace("third"))
        await until(lambda: bool(watches(server, "pods")))
        server.bookmark()
        await until(lambda: pods.resource_version == str(server.rv))
        assert int(pods.resource_version) > int(listed)
        # The next watch (this one times out after 1 s) resumes from the bookmark.
        await until(lambda: len(watches(server, "pods")) >= 2, timeout=5)
        first, second = watches(server, "pods")[:2]
        assert first.bookmarks == [server.rv] and first.ended == "timeout"
        assert second.from_rv == server.rv
        assert all(w.sent == [] for w in watches(server, "pods"))


async def test_a_dropped_watch_resumes_without_losing_or_repeating_events(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, demo_cluster()) as (server, controller):
        listed = int(controller.reflector("pods").resource_version)
        await until(lambda: bool(watches(server, "pods")))
        for i in range(5):
            server.put(k.pod("demo", f"a-{i}", f"10.0.2.{i + 1}"))
        await until(lambda: len(watches(server, "pods")[0].sent) == 5)
        server.drop_watches()  # half an event, then the connection closes
        for i in range(5):  # while the source backs off and reconnects
            server.put(k.pod("demo", f"b-{i}", f"10.0.3.{i + 1}"))
        server.delete("v1", "pods", "demo", "a-0")
        await until(lambda: controller.workload("demo", "b-4") is not None)
        await until(lambda: controller.workload("demo", "a-0") is None)
        first, second = watches(server, "pods")[:2]
        assert first.ended == "dropped"
        assert second.from_rv == first.sent[-1]
        assert_exactly_once(server, "pods", listed)
        expected = set(server.collections[("v1", "pods")].objects)
        assert set(controller.reflector("pods").objects) == expected


async def test_gone_mid_watch_relists(tmp_path: Path) -> None:
    async with running(tmp_path, demo_cluster()) as (server, controller):
        await until(lambda: bool(watches(server, "pods")))
        lists_before = _lists(server, "/api/v1/pods")
        server.put(k.pod("demo", "c-1", "10.0.4.1"))
        await until(lambda: controller.workload("demo", "c-1") is not None)
        server.expire_watches()  # ERROR event, Status code 410
        server.put(k.pod("demo", "c-2", "10.0.4.2"))
        await until(lambda: controller.workload("demo", "c-2") is not None)
        assert _lists(server, "/api/v1/pods") == lists_before + 1
        assert watches(server, "pods")[0].ended == "gone"
        # After the re-list the watch starts from the list's resourceVersion.
        resumed = watches(server, "pods")[-1]
        assert resumed.from_rv >= server.compacted


async def test_gone_at_watch_start_relists_and_sees_deletions(tmp_path: Path) -> None:
    async with running(tmp_path, demo_cluster()) as (server, controller):
        await until(lambda: bool(watches(server, "pods")))
        lists_before = _lists(server, "/api/v1/pods")
        # The connection drops, and the history the source would resume from is compacted
        # away before it comes back: its watch is refused with HTTP 410.
        server.drop_watches()
        server.delete("v1", "pods", "demo", "client")
        server.put(k.pod("demo", "d-1", "10.0.5.1"))
        server.compact()
        await until(lambda: controller.workload("demo", "d-1") is not None)
        assert controller.workload("demo", "client") is None
        asked = [q for m, p, q in server.requests if p == "/api/v1/pods" and "watch" in q]
        assert len(asked) == len(watches(server, "pods")) + 1  # one was answered 410
        assert _lists(server, "/api/v1/pods") == lists_before + 1
        expected = set(server.collections[("v1", "pods")].objects)
        assert set(controller.reflector("pods").objects) == expected


async def test_errors_back_off_with_bounded_delays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "controller.sources.kubernetes_watch")
    async with standin(tmp_path) as (server, api):
        server.fail_next(6, 500)
        controller = Controller(api)
        task = asyncio.create_task(controller.source.run())
        started = asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(controller.source.applied.wait(), 5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Six failures spread over reflectors: each backs off at most 0.02 * 2**5 * 1.2 s.
        assert asyncio.get_running_loop().time() - started < 2.0
        delays = [
            float(m) for m in re.findall(r"HTTP 500: .*; retrying in ([0-9.]+) s", caplog.text)
        ]
        assert len(delays) == 6 and all(0.0 < d <= 0.2 * 1.2 for d in delays)


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    backoff = Backoff(base=0.5, cap=30.0, jitter=0.2, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    for attempt, delay in enumerate(delays):
        nominal = min(30.0, 0.5 * 2**attempt)
        assert nominal * 0.8 <= delay <= nominal * 1.2
    assert len({round(d / min(30.0, 0.5 * 2**i), 6) for i, d in enumerate(delays)}) > 1
    backoff.reset()
    assert backoff.next_delay() <= 0.6


async def test_pages_are_followed(tmp_path: Path) -> None:
    seed = [*demo_cluster(), *(k.pod("demo", f"p-{i}", f"10.0.6.{i + 1}") for i in range(5))]
    async with running(tmp_path, seed, page_size=2) as (server, controller):
        assert controller.workload("demo", "p-4") is not None
        pages = [q for m, p, q in server.requests if p == "/api/v1/pods" and "watch" not in q]
        assert [q.get("continue") for q in pages] == [None, "2", "4", "6"]


async def test_a_crd_not_installed_is_skipped_with_one_warning_then_found(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "controller.sources.kubernetes_watch")
    async with running(tmp_path, demo_cluster(), skip=["ratelimits"]) as (server, controller):
        assert controller.workload("demo", "server") is not None
        await until(lambda: _lists(server, "/apis/ambimesh.io/v1alpha1/ratelimits") >= 3)
        warnings = [r for r in caplog.records if "ratelimits" in r.getMessage()]
        assert len(warnings) == 1 and "not served" in warnings[0].getMessage()
        # The CRD gets installed: found on the next look.
        server.add_kind("RateLimit", "ambimesh.io/v1alpha1", "ratelimits", crd=True)
        await until(lambda: controller.reflector("ratelimits").api_version != "")
        await until(lambda: bool(watches(server, "ratelimits")))


async def test_a_rejected_state_keeps_the_last_good_configuration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(tmp_path, demo_cluster()) as (server, controller):
        good = controller.store.current
        server.put(k.namespace("demo", {"ambimesh.io/dataplane-mode": "sideways"}))
        await until(lambda: "configuration rejected" in caplog.text)
        assert "kubernetes: Pod demo/" in caplog.text
        assert controller.store.current is good
        assert controller.source.rejected >= 1  # ambimesh_controller_config_rejects_total
        server.put(k.namespace("demo", {"ambimesh.io/dataplane-mode": "none"}))
        await until(lambda: controller.store.current.serial > good.serial)
        assert not controller.workload("demo", "server").ambient  # type: ignore[union-attr]


async def test_endpoint_slices_decide_a_services_endpoints(tmp_path: Path) -> None:
    seed = [
        *demo_cluster(),
        k.pod("demo", "server-2", "10.0.0.4", labels={"app": "server"}),
        k.service("demo", "external", "10.96.0.11", None),  # no selector
    ]
    async with running(tmp_path, seed) as (server, controller):
        uid = {n: controller.workload("demo", n).uid for n in ("server", "server-2", "client")}  # type: ignore[union-attr]
        assert set(controller.service("demo", "server").endpoint_uids) == {  # type: ignore[union-attr]
            uid["server"],
            uid["server-2"],
        }
        # The endpoints controller writes slices: server-2 is terminating (not ready).
        server.put(
            k.endpoint_slice(
                "demo",
                "server-abc12",
                "server",
                [("server", "10.0.0.2", True), ("server-2", "10.0.0.4", False)],
            )
        )
        # A selector-less Service's endpoints exist only as slices.
        server.put(
            k.endpoint_slice("demo", "external-1", "external", [("client", "10.0.0.3", True)])
        )
        await until(
            lambda: list(controller.service("demo", "external").endpoint_uids) == [uid["client"]]  # type: ignore[union-attr]
        )
        assert list(controller.service("demo", "server").endpoint_uids) == [uid["server"]]  # type: ignore[union-attr]
        server.delete("discovery.k8s.io/v1", "endpointslices", "demo", "server-abc12")
        await until(lambda: len(controller.service("demo", "server").endpoint_uids) == 2)  # type: ignore[union-attr]


def _lists(server: StandinApi, path: str) -> int:
    return sum(1 for m, p, q in server.requests if p == path and "watch" not in q)
