"""quote and clip: user values in messages, bounded whatever their size or shape."""

from __future__ import annotations

import time
from typing import Any

from controller.quoting import LIMIT, clip, quote


def test_short_values_are_plain_repr() -> None:
    assert quote("STRICTER") == "'STRICTER'"
    assert quote(70000) == "70000"
    assert quote({"a": [1, 2]}) == "{'a': [1, 2]}"
    assert clip("demo/web") == "demo/web"


def test_long_strings_are_cut_with_their_length() -> None:
    assert quote("x" * 5000) == f"{'x' * LIMIT!r}…(5000 chars)"
    assert clip("y" * 5000) == f"{'y' * LIMIT}…(5000 chars)"


def test_a_billion_item_structure_is_quoted_quickly_and_briefly() -> None:
    value: list[Any] = ["lol"] * 10
    for _ in range(8):
        value = [value] * 10
    started = time.monotonic()
    text = quote(value)
    assert time.monotonic() - started < 0.1
    assert text.startswith("[[[") and len(text) <= LIMIT + 1
