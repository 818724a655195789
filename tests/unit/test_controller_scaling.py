"""What keeps the controller's work per change small with many pods and nodes: the
translation memo, the files source re-reading only changed files, the services' label
index, and responses serialized once for every node (bench/controller_scale.py measures
them; these check they never change a result)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from controller.push_service import DELTAS_KEPT, NEWER, Encoder, Inbox
from controller.sources.files import DirectoryWatcher
from controller.store import Store, diff
from controller.translate import Memo, SourcedObject, translate
from mesh.api import mesh_pb2
from tests.unit.test_translate import ns, pod, run, service

AMBIENT = {"ambimesh.io/dataplane-mode": "ambient"}


def sourced(objects: list[dict[str, Any]]) -> list[SourcedObject]:
    return [SourcedObject(o, f"cfg.yaml#{i + 1}") for i, o in enumerate(objects)]


def test_memo_reuses_unchanged_pods_and_redoes_those_whose_namespace_changed() -> None:
    pods = [pod(f"a-{n}", "a", ip=f"10.0.1.{n + 1}") for n in range(3)]
    pods += [pod(f"b-{n}", "b", ip=f"10.0.2.{n + 1}") for n in range(3)]
    objects = [ns("a", AMBIENT), ns("b", AMBIENT), *pods]
    memo = Memo()
    first = translate(sourced(objects), memo=memo)
    assert first == translate(sourced(objects))
    objects[1] = ns("b", {"ambimesh.io/dataplane-mode": "none"})  # a relabel: a new object
    second = translate(sourced(objects), memo=memo)
    assert second == translate(sourced(objects))
    assert not any(second[f"workload/b/b-{n}"].workload.ambient for n in range(3))
    # Namespace a's pods were not translated again: the very same resources.
    assert all(second[f"workload/a/a-{n}"] is first[f"workload/a/a-{n}"] for n in range(3))


def test_memo_translates_a_changed_pod_again() -> None:
    objects = [ns("demo", AMBIENT), pod("web", ip="10.0.0.1")]
    memo = Memo()
    translate(sourced(objects), memo=memo)
    objects[1] = pod("web", ip="10.0.0.2")
    out = translate(sourced(objects), memo=memo)
    assert list(out["workload/demo/web"].workload.addresses) == ["10.0.0.2"]


def test_service_selector_with_several_labels_uses_every_one() -> None:
    out = run(
        pod("v1", labels={"app": "web", "v": "1"}, ip="10.0.0.1", metadata={"uid": "u1"}),
        pod("v2", labels={"app": "web", "v": "2"}, ip="10.0.0.2", metadata={"uid": "u2"}),
        pod("v1-prod", "prod", {"app": "web", "v": "1"}, ip="10.0.0.3", metadata={"uid": "u3"}),
        service("web-v1", {"app": "web", "v": "1"}, [{"port": 80}]),
        service("none", {}, [{"port": 80}], clusterIP="10.96.0.11"),
    )
    assert list(out["service/demo/web-v1"].service.endpoint_uids) == ["u1"]
    assert list(out["service/demo/none"].service.endpoint_uids) == []


def test_directory_watcher_parses_only_the_files_that_changed(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    (tmp_path / "b.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n")
    loads: list[list[SourcedObject]] = []
    watcher = DirectoryWatcher(tmp_path, loads.append)
    watcher.load_once()
    (tmp_path / "b.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: b, labels: {x: y}}\n"
    )
    watcher.load_once()
    (before_a, before_b), (after_a, after_b) = loads
    assert after_a.obj is before_a.obj
    assert after_b.obj is not before_b.obj and after_b.obj["metadata"]["labels"] == {"x": "y"}


def resources(*names: str) -> dict[str, mesh_pb2.Resource]:
    return {
        f"workload/ns/{n}": mesh_pb2.Resource(
            key=f"workload/ns/{n}", workload=mesh_pb2.Workload(name=n)
        )
        for n in names
    }


def test_encoder_serializes_each_full_snapshot_and_delta_once() -> None:
    async def scenario() -> None:
        store = Store()
        one = store.replace(resources("a", "b"))
        two = store.replace(resources("a", "c"))
        encoder = Encoder()
        full = encoder.encode(None, two)
        assert encoder.encode(None, two) is full
        parsed = mesh_pb2.DiscoveryResponse.FromString(full)
        assert parsed.full and parsed.version == two.version
        assert [r.key for r in parsed.resources] == ["workload/ns/a", "workload/ns/c"]
        delta = encoder.encode(one, two)
        assert encoder.encode(one, two) is delta
        parsed = mesh_pb2.DiscoveryResponse.FromString(delta)
        want = diff(one, two)
        assert not parsed.full and list(parsed.removed) == want.removed == ["workload/ns/b"]
        assert list(parsed.resources) == want.changed
        # Old deltas are forgotten, never wrong: a node that far behind gets one rebuilt.
        for n in range(DELTAS_KEPT):
            store.replace(resources("a", f"x{n}"))
            encoder.encode(two, store.current)
        rebuilt = encoder.encode(one, two)
        assert rebuilt == delta and rebuilt is not delta

    asyncio.run(scenario())


def test_store_keeps_the_published_copy_of_an_unchanged_resource() -> None:
    store = Store()
    one = store.replace(resources("a", "b"))
    changed = resources("a", "b")
    changed["workload/ns/b"].workload.node = "elsewhere"
    two = store.replace(changed)
    assert two.resources["workload/ns/a"] is one.resources["workload/ns/a"]
    assert two.resources["workload/ns/b"].workload.node == "elsewhere"
    assert [r.key for r in diff(one, two).changed] == ["workload/ns/b"]


def test_a_streams_inbox_holds_one_notice_of_newer_versions_however_many_come() -> None:
    """A stuck node reads nothing: its inbox must not grow with every version."""

    async def scenario() -> None:
        inbox = Inbox()
        for _ in range(3):
            inbox.announce()
        assert inbox.qsize() == 1
        assert await inbox.next() is NEWER
        inbox.announce()
        assert inbox.qsize() == 1

    asyncio.run(scenario())
