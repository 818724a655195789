"""ConfigMemo (waypoint/memo.py): a value is computed once per configuration, objects and
extra key; a new configuration or the size limit starts afresh; cached objects stay alive
so their ids cannot be reused."""

from __future__ import annotations

import gc
import weakref

from waypoint.memo import ConfigMemo


class Obj:
    """A stand-in for a configuration object (hashable or not does not matter)."""

    __hash__ = None  # type: ignore[assignment]  # as protobuf messages


def test_computed_once_per_objects_and_extra() -> None:
    memo: ConfigMemo[int] = ConfigMemo()
    config, a, b = object(), Obj(), Obj()
    calls: list[str] = []

    def compute(name: str) -> int:
        calls.append(name)
        return len(calls)

    assert memo.get(config, (a,), 1, lambda: compute("a1")) == 1
    assert memo.get(config, (a,), 1, lambda: compute("again")) == 1
    assert memo.get(config, (a,), 2, lambda: compute("a2")) == 2
    assert memo.get(config, (b,), 1, lambda: compute("b1")) == 3
    assert memo.get(config, (a, b), 1, lambda: compute("ab")) == 4
    assert memo.get(config, (b, a), 1, lambda: compute("ba")) == 5
    assert calls == ["a1", "a2", "b1", "ab", "ba"]


def test_a_new_configuration_recomputes() -> None:
    memo: ConfigMemo[str] = ConfigMemo()
    a = Obj()
    assert memo.get(object(), (a,), None, lambda: "old") == "old"
    assert memo.get(object(), (a,), None, lambda: "new") == "new"
    assert len(memo) == 1


def test_the_limit_starts_afresh() -> None:
    memo: ConfigMemo[int] = ConfigMemo(limit=3)
    config = object()
    objects = [Obj() for _ in range(4)]
    for i, o in enumerate(objects):
        memo.get(config, (o,), None, lambda i=i: i)  # type: ignore[misc]
    assert len(memo) == 1  # the 4th found 3 entries and cleared them first
    assert memo.get(config, (objects[0],), None, lambda: 99) == 99


def test_cached_objects_stay_alive() -> None:
    memo: ConfigMemo[int] = ConfigMemo()
    config = object()
    o = Obj()
    ref = weakref.ref(o)
    memo.get(config, (o,), None, lambda: 1)
    del o
    gc.collect()
    assert ref() is not None  # so no other object can get its id while it is cached
    memo.get(object(), (), None, lambda: 2)  # a new configuration lets it go
    gc.collect()
    assert ref() is None
