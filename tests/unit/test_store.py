"""Versioned snapshots, deltas and change waits."""

from __future__ import annotations

import asyncio

import pytest

from controller.store import Store, diff
from mesh.api import mesh_pb2


def wl(name: str, node: str = "node-a") -> mesh_pb2.Resource:
    key = f"workload/demo/{name}"
    return mesh_pb2.Resource(
        key=key, workload=mesh_pb2.Workload(name=name, namespace="demo", node=node)
    )


def as_map(*resources: mesh_pb2.Resource) -> dict[str, mesh_pb2.Resource]:
    return {r.key: r for r in resources}


def test_versions_increase_only_on_change() -> None:
    store = Store()
    assert store.current.version == "0"
    first = store.replace(as_map(wl("a")))
    assert first.version == "1"
    assert store.replace(as_map(wl("a"))) is first
    assert store.replace(as_map(wl("a", node="node-b"))).version == "2"


def test_delta_lists_changed_added_and_removed() -> None:
    store = Store()
    old = store.replace(as_map(wl("a"), wl("b"), wl("c")))
    new = store.replace(as_map(wl("a"), wl("b", node="node-b"), wl("d")))
    delta = diff(old, new)
    assert [r.key for r in delta.changed] == ["workload/demo/b", "workload/demo/d"]
    assert delta.removed == ["workload/demo/c"]
    assert diff(new, new).changed == [] and diff(new, new).removed == []


def test_snapshots_are_immutable_for_readers() -> None:
    store = Store()
    mine = as_map(wl("a"))
    snap = store.replace(mine)
    mine["workload/demo/a"].workload.node = "elsewhere"
    mine["workload/demo/z"] = wl("z")
    assert snap.resources["workload/demo/a"].workload.node == "node-a"
    assert list(snap.resources) == ["workload/demo/a"]
    with pytest.raises(TypeError):
        snap.resources["x"] = wl("x")  # type: ignore[index]


def test_key_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="has key"):
        Store().replace({"workload/demo/other": wl("a")})


async def test_wait_newer_wakes_on_change_and_coalesces() -> None:
    store = Store()
    waiter = asyncio.create_task(store.wait_newer(0))
    await asyncio.sleep(0)
    assert not waiter.done()
    store.replace(as_map(wl("a")))
    store.replace(as_map(wl("b")))
    snap = await asyncio.wait_for(waiter, 1)
    assert snap.version == "2"
    assert (await asyncio.wait_for(store.wait_newer(1), 1)).version == "2"
