"""The YAML directory source: parsing, error locations, change detection, last good kept."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.sources.files import (
    MAX_FILE_BYTES,
    DirectoryWatcher,
    SourceError,
    fingerprint,
    load_directory,
)
from controller.translate import SourcedObject

POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo}}
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_loads_multi_document_files_recursively(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", POD.format(name="one") + "---\n---\n" + POD.format(name="two"))
    write(tmp_path / "sub" / "b.yml", POD.format(name="three"))
    write(tmp_path / "notes.txt", "not: config")
    write(tmp_path / ".git" / "x.yaml", POD.format(name="hidden"))
    objects = load_directory(tmp_path)
    assert [(o.obj["metadata"]["name"], o.source) for o in objects] == [
        ("one", f"{tmp_path / 'a.yaml'}#1"),
        ("two", f"{tmp_path / 'a.yaml'}#3"),
        ("three", f"{tmp_path / 'sub' / 'b.yml'}#1"),
    ]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "bad.yaml", "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n")
    with pytest.raises(SourceError, match=r"bad\.yaml:\d+: YAML syntax error"):
        load_directory(tmp_path)


def test_non_mapping_document_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(SourceError, match=r"list\.yaml#1: a document must be"):
        load_directory(tmp_path)


def alias_bomb(levels: int) -> str:
    """A Pod whose podIP is a list of 10**levels strings, in a few hundred bytes of YAML."""
    lines = ["apiVersion: v1", "kind: Pod", "metadata: {name: web, namespace: demo}", "x:"]
    lines.append("  l0: &l0 [" + ", ".join(["lol"] * 10) + "]")
    for level in range(1, levels):
        lines.append(f"  l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    lines.append(f"status: {{podIP: *l{levels - 1}}}")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    write(tmp_path / "ok.yaml", POD.format(name="one"))
    write(tmp_path / "bomb.yaml", alias_bomb(9))
    started = time.monotonic()
    with pytest.raises(SourceError) as info:
        load_directory(tmp_path)
    assert time.monotonic() - started < 2
    assert str(info.value).startswith(f"{tmp_path / 'bomb.yaml'}:11: the file expands to more")
    assert "the limit for a file, YAML aliases written out" in str(info.value)


def test_modest_aliases_load(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", alias_bomb(3) + "---\n" + POD.format(name="two"))
    first, second = load_directory(tmp_path)
    assert len(first.obj["status"]["podIP"]) == 10
    assert second.obj["metadata"]["name"] == "two"


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "loop.yaml", POD.format(name="one") + "spec: &s {containers: [*s]}\n")
    with pytest.raises(SourceError, match=r"loop\.yaml:4: a YAML alias refers to itself"):
        load_directory(tmp_path)


def test_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    write(tmp_path / "big.yaml", POD.format(name="one") + "#" * MAX_FILE_BYTES + "\n")
    with pytest.raises(SourceError, match=rf"big\.yaml: larger than {MAX_FILE_BYTES} bytes"):
        load_directory(tmp_path)


def test_device_posing_as_config_is_refused(tmp_path: Path) -> None:
    """A symlink to /dev/zero would be read forever; any non-regular file is refused."""
    (tmp_path / "dev.yaml").symlink_to("/dev/null")
    with pytest.raises(SourceError, match=r"dev\.yaml: not a regular file"):
        load_directory(tmp_path)


def test_value_python_cannot_build_names_the_document(tmp_path: Path) -> None:
    write(tmp_path / "int.yaml", POD.format(name="one") + "---\nport: " + "9" * 5000 + "\n")
    with pytest.raises(SourceError, match=r"int\.yaml#2: cannot load: 'Exceeds the limit"):
        load_directory(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        load_directory(tmp_path / "nope")


def test_fingerprint_changes_with_content_and_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", POD.format(name="one"))
    before = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == before
    write(tmp_path / "a.yaml", POD.format(name="uno"))
    os.utime(tmp_path / "a.yaml", ns=(1, 1))
    changed = fingerprint(tmp_path)
    assert changed != before
    write(tmp_path / "b.yaml", POD.format(name="two"))
    assert fingerprint(tmp_path) != changed


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_watcher_applies_changes_and_keeps_last_good_on_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "a.yaml", POD.format(name="one"))
    applied: list[list[str]] = []

    def apply(objects: list[SourcedObject]) -> None:
        applied.append([o.obj["metadata"]["name"] for o in objects])

    watcher = DirectoryWatcher(tmp_path, apply, interval=0.02)
    watcher.load_once()
    assert applied == [["one"]]
    task = asyncio.create_task(watcher.run())
    try:
        write(tmp_path / "b.yaml", POD.format(name="two"))
        await wait_for(lambda: applied[-1] == ["one", "two"])

        caplog.set_level(logging.ERROR)
        write(tmp_path / "c.yaml", "kind: [\n")
        await wait_for(lambda: "c.yaml" in caplog.text)
        assert "keeping the last good" in caplog.text
        assert applied[-1] == ["one", "two"]
        assert watcher.rejected == 1  # ambimesh_controller_config_rejects_total
        count = len(applied)
        await asyncio.sleep(0.1)
        assert len(applied) == count, "an unchanged bad directory is not re-applied"

        (tmp_path / "c.yaml").unlink()
        write(tmp_path / "b.yaml", POD.format(name="deux"))
        await wait_for(lambda: applied[-1] == ["one", "deux"])
    finally:
        task.cancel()


async def test_watcher_outlives_a_bug_in_apply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "a.yaml", POD.format(name="one"))
    applied: list[str] = []

    def apply(objects: list[SourcedObject]) -> None:
        name = objects[0].obj["metadata"]["name"]
        if name == "boom":
            raise KeyError(name)
        applied.append(name)

    watcher = DirectoryWatcher(tmp_path, apply, interval=0.02)
    watcher.load_once()
    task = asyncio.create_task(watcher.run())
    try:
        write(tmp_path / "a.yaml", POD.format(name="boom"))
        await wait_for(lambda: "a bug" in caplog.text)
        assert "KeyError: 'boom'" in caplog.text
        write(tmp_path / "a.yaml", POD.format(name="two"))
        await wait_for(lambda: applied[-1] == "two")
    finally:
        task.cancel()
