"""mesh.hbone.heap: glibc takes every setting (thresholds, arena cap)."""

from __future__ import annotations

import ctypes

import pytest

from mesh.hbone import heap


def _glibc() -> bool:
    return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


@pytest.mark.skipif(not _glibc(), reason="mallopt settings are glibc's")
def test_glibc_accepts_every_setting() -> None:
    assert heap.tune()
