"""bpf/maps.py against the layouts bcc derives from bpf/src/maps.h: they cannot drift."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from typing import Any

import pytest

from bpf.loader import MeshBpf, check_environment
from bpf.maps import LAYOUTS
from tests.integration.privileged import require_privileged

pytestmark = pytest.mark.privileged


@pytest.fixture(scope="module")
def mesh() -> Iterator[MeshBpf]:
    require_privileged()
    with MeshBpf() as loaded:
        yield loaded


def layout(cls: Any) -> tuple[int, list[tuple[str, int, int]]]:
    """Size and (name, offset, size) per field; scalars have no fields."""
    fields = [
        (name, getattr(cls, name).offset, getattr(cls, name).size)
        for name, *_ in getattr(cls, "_fields_", ())
    ]
    return ctypes.sizeof(cls), fields


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_python_layout_matches_c(mesh: MeshBpf, name: str) -> None:
    table = mesh.table(name)
    key, value = LAYOUTS[name]
    # Per-CPU tables expose one CPU's value type as sLeaf and an array of them as Leaf.
    leaf = getattr(table, "sLeaf", table.Leaf)
    assert layout(key) == layout(table.Key), f"{name} key"
    assert layout(value) == layout(leaf), f"{name} value"


def test_check_environment_passes_here() -> None:
    require_privileged()
    check_environment()
