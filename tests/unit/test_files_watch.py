"""The files source's inotify watch: changes are seen at once, not at the next poll, the
ways configuration directories are really updated (an editor's write, an atomic rename, a
new subdirectory, a ConfigMap volume's ``..data`` swap), and polling when inotify fails.

The polling interval and the backstop scan are set to a minute here, so a test passes
only if the watch woke the source."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import inotify_simple  # type: ignore[import-untyped]
import pytest

from controller.sources import files
from controller.sources.files import DirectoryWatcher
from controller.translate import SourcedObject

NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"
NEVER = 60.0


def names(objects: list[SourcedObject]) -> list[str]:
    return sorted(o.obj["metadata"]["name"] for o in objects)


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


class Running:
    def __init__(self, root: Path) -> None:
        self.applied: list[list[str]] = []
        self.watcher = DirectoryWatcher(root, lambda objs: self.applied.append(names(objs)), NEVER)

    def last(self) -> list[str]:
        return self.applied[-1]


@pytest.fixture
async def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Running]:
    monkeypatch.setattr(files, "BACKSTOP_INTERVAL", NEVER)
    (tmp_path / "a.yaml").write_text(NAMESPACE.format(name="a"))
    run = Running(tmp_path)
    run.watcher.load_once()
    task = asyncio.create_task(run.watcher.run())
    await asyncio.sleep(0.1)  # the watch is set up
    yield run
    task.cancel()


async def test_an_edit_in_place_is_seen_without_waiting_for_a_poll(
    tmp_path: Path, running: Running
) -> None:
    (tmp_path / "a.yaml").write_text(NAMESPACE.format(name="a2"))
    await wait_for(lambda: running.last() == ["a2"])


async def test_an_atomic_rename_and_a_removal_are_seen(tmp_path: Path, running: Running) -> None:
    (tmp_path / ".b.yaml.tmp").write_text(NAMESPACE.format(name="b"))
    os.replace(tmp_path / ".b.yaml.tmp", tmp_path / "b.yaml")
    await wait_for(lambda: running.last() == ["a", "b"])
    (tmp_path / "a.yaml").unlink()
    await wait_for(lambda: running.last() == ["b"])


async def test_a_file_in_a_new_subdirectory_is_seen(tmp_path: Path, running: Running) -> None:
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "c.yaml").write_text(NAMESPACE.format(name="c"))
    await wait_for(lambda: running.last() == ["a", "c"])
    (tmp_path / "team" / "c.yaml").write_text(NAMESPACE.format(name="c2"))
    await wait_for(lambda: running.last() == ["a", "c2"])


async def test_a_configmap_volume_update_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kubelet's layout: ``app.yaml -> ..data/app.yaml``, ``..data -> ..<stamp>``; an update
    writes a new ``..<stamp>`` directory and renames a new ``..data`` symlink over the old."""
    monkeypatch.setattr(files, "BACKSTOP_INTERVAL", NEVER)
    root = tmp_path / "volume"
    root.mkdir()

    def publish(stamp: str, name: str) -> None:
        (root / stamp).mkdir()
        (root / stamp / "app.yaml").write_text(NAMESPACE.format(name=name))
        (root / "..data_tmp").symlink_to(stamp)
        os.replace(root / "..data_tmp", root / "..data")

    publish("..2026_1", "one")
    (root / "app.yaml").symlink_to("..data/app.yaml")
    run = Running(root)
    run.watcher.load_once()
    task = asyncio.create_task(run.watcher.run())
    try:
        await asyncio.sleep(0.1)
        publish("..2026_2", "two")
        (root / "..2026_1" / "app.yaml").unlink()
        (root / "..2026_1").rmdir()
        await wait_for(lambda: run.last() == ["two"])
        publish("..2026_3", "three")
        await wait_for(lambda: run.last() == ["three"])
    finally:
        task.cancel()


async def test_without_inotify_the_source_polls_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(**_: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(inotify_simple, "INotify", refuse)
    (tmp_path / "a.yaml").write_text(NAMESPACE.format(name="a"))
    applied: list[list[str]] = []
    watcher = DirectoryWatcher(tmp_path, lambda objs: applied.append(names(objs)), 0.02)
    watcher.load_once()
    caplog.set_level(logging.WARNING)
    task = asyncio.create_task(watcher.run())
    try:
        (tmp_path / "a.yaml").write_text(NAMESPACE.format(name="a2"))
        await wait_for(lambda: applied[-1] == ["a2"])
        assert "Too many open files" in caplog.text and "polling it instead" in caplog.text
    finally:
        task.cancel()


async def test_when_a_directory_cannot_be_watched_the_source_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(*_: object) -> int:
        raise OSError(28, "No space left on device")  # fs.inotify.max_user_watches reached

    monkeypatch.setattr(inotify_simple.INotify, "add_watch", full)
    caplog.set_level(logging.WARNING)
    (tmp_path / "a.yaml").write_text(NAMESPACE.format(name="a"))
    applied: list[list[str]] = []
    watcher = DirectoryWatcher(tmp_path, lambda objs: applied.append(names(objs)), 0.02)
    watcher.load_once()
    task = asyncio.create_task(watcher.run())
    try:
        (tmp_path / "a.yaml").write_text(NAMESPACE.format(name="a2"))
        await wait_for(lambda: applied[-1] == ["a2"])
        assert "No space left" in caplog.text and "polling the configuration" in caplog.text
    finally:
        task.cancel()


async def test_a_directory_replaced_between_two_scans_is_watched_again(
    tmp_path: Path, running: Running
) -> None:
    """``rm -r team && cp -r new-team team``: the kernel drops the old directory's watch;
    the path, still the same, must be watched anew."""
    team = tmp_path / "team"
    team.mkdir()
    (team / "c.yaml").write_text(NAMESPACE.format(name="c"))
    await wait_for(lambda: running.last() == ["a", "c"])
    (team / "c.yaml").unlink()
    team.rmdir()
    team.mkdir()
    (team / "d.yaml").write_text(NAMESPACE.format(name="d"))
    await wait_for(lambda: running.last() == ["a", "d"])
    await asyncio.sleep(0.1)  # every event of the replacement read
    (team / "d.yaml").write_text(NAMESPACE.format(name="d2"))  # seen only through a new watch
    await wait_for(lambda: running.last() == ["a", "d2"])
