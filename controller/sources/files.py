"""A directory of multi-document YAML files as a configuration source, polled for changes.

Polling (stat of every file, every half second) is cheap for a config directory and works
the same on a ConfigMap volume, a git checkout and a bind mount. Names starting with a
dot are skipped: that keeps ``.git`` out and reads a ConfigMap volume's files once,
through their top-level symlinks, not again through ``..data``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import yaml

from controller.translate import ConfigError, SourcedObject

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml")
POLL_INTERVAL = 0.5

Fingerprint = tuple[tuple[str, int, int], ...]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SourceError(ConfigError):
    """A file in the directory cannot be read or parsed."""


def config_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise SourceError(f"{root}: configuration directory does not exist or is not a directory")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / name
            for name in sorted(filenames)
            if not name.startswith(".") and name.endswith(SUFFIXES)
        )
    return found


def fingerprint(root: Path) -> Fingerprint:
    """What changes when any configuration file is added, removed or edited."""
    out: list[tuple[str, int, int]] = []
    for path in config_files(root):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(out)


def load_directory(root: Path) -> list[SourcedObject]:
    """Every object in every file, each tagged ``<file>#<document number>``."""
    objects: list[SourcedObject] = []
    for path in config_files(root):
        objects.extend(load_file(path))
    return objects


def load_file(path: Path) -> list[SourcedObject]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read: {e}") from None
    objects: list[SourcedObject] = []
    try:
        for index, doc in enumerate(yaml.load_all(text, Loader=_Loader), start=1):
            if doc is None:
                continue
            source = f"{path}#{index}"
            if not isinstance(doc, dict):
                raise SourceError(f"{source}: a document must be a Kubernetes object (a mapping)")
            objects.append(SourcedObject(doc, source))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise SourceError(f"{path}{line}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise SourceError(f"{path}: YAML error: {e}") from None
    return objects


class DirectoryWatcher:
    """Feeds the directory's objects to ``apply`` at start and after every change.

    ``apply`` raising :class:`ConfigError` rejects that update: the error is logged once
    and the caller's last good configuration stays until the files change again.
    """

    def __init__(
        self,
        root: Path,
        apply: Callable[[list[SourcedObject]], None],
        interval: float = POLL_INTERVAL,
    ) -> None:
        self._root = root
        self._apply = apply
        self._interval = interval
        self._seen: Fingerprint | None = None

    def load_once(self) -> None:
        """Load and apply now; errors propagate (used at startup, where there is no last good)."""
        stamp = fingerprint(self._root)
        self._apply(load_directory(self._root))
        self._seen = stamp

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                stamp = await asyncio.to_thread(fingerprint, self._root)
                if stamp == self._seen:
                    continue
                self._seen = stamp
                objects = await asyncio.to_thread(load_directory, self._root)
                self._apply(objects)
            except ConfigError as e:
                log.error("configuration rejected, keeping the last good one: %s", e)
