"""The YAML directory source: parsing, error locations, change detection, last good kept."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from controller.sources.files import DirectoryWatcher, SourceError, fingerprint, load_directory
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
        count = len(applied)
        await asyncio.sleep(0.1)
        assert len(applied) == count, "an unchanged bad directory is not re-applied"

        (tmp_path / "c.yaml").unlink()
        write(tmp_path / "b.yaml", POD.format(name="deux"))
        await wait_for(lambda: applied[-1] == ["one", "deux"])
    finally:
        task.cancel()
