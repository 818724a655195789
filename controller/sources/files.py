"""A directory of multi-document YAML files as a configuration source, watched for changes.

What changed is found by comparing every file's (mtime, size) with the last scan's: cheap
for a config directory, and the same on a ConfigMap volume, a git checkout and a bind
mount. When to scan comes from inotify (:mod:`controller.sources.dirwatch`): a change is
seen within milliseconds, where polling every half second saw it 0.25 s later on average.
A scan also runs every :data:`BACKSTOP_INTERVAL` s, for what inotify cannot see (a network
filesystem's remote writers, a replaced directory); where the watch cannot be set up the
source polls every :data:`POLL_INTERVAL` s, as it always did, and says so in the log.
Names starting with a dot are skipped: that keeps ``.git`` out and reads a ConfigMap
volume's files once, through their top-level symlinks, not again through ``..data``.

A file is untrusted input: it may be at most :data:`MAX_FILE_BYTES` long, and may expand
(YAML aliases repeat a subtree without copying it in the text) to at most
:data:`MAX_EXPANDED_SIZE` nodes plus scalar characters, counted on the composed node graph
before any object is built, so an alias bomb costs a walk over what the file spells out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from controller.quoting import quote
from controller.sources.dirwatch import DirectoryEvents
from controller.translate import ConfigError, SourcedObject

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml")
POLL_INTERVAL = 0.5
BACKSTOP_INTERVAL = 5.0
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_EXPANDED_SIZE = 16 * 1024 * 1024

Fingerprint = tuple[tuple[str, int, int], ...]

_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class SourceError(ConfigError):
    """A file in the directory cannot be read or parsed."""


def config_files(root: Path) -> list[Path]:
    return _walk(root)[1]


def _walk(root: Path) -> tuple[list[str], list[Path]]:
    """The directories walked and the configuration files found in them."""
    if not root.is_dir():
        raise SourceError(f"{root}: configuration directory does not exist or is not a directory")
    walked: list[str] = []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        walked.append(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath) / name
            for name in sorted(filenames)
            if not name.startswith(".") and name.endswith(SUFFIXES)
        )
    return walked, found


def fingerprint(root: Path) -> Fingerprint:
    """What changes when any configuration file is added, removed or edited."""
    return _scan(root)[1]


def _scan(root: Path) -> tuple[set[str], Fingerprint]:
    """The directories to watch (those walked and each file's real one) and the fingerprint."""
    walked, files = _walk(root)
    watch = set(walked)
    out: list[tuple[str, int, int]] = []
    for path in files:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out.append((str(path), st.st_mtime_ns, st.st_size))
        watch.add(os.path.dirname(os.path.realpath(path)))
    return watch, tuple(out)


def load_directory(root: Path) -> list[SourcedObject]:
    """Every object in every file, each tagged ``<file>#<document number>``."""
    objects: list[SourcedObject] = []
    for path in config_files(root):
        objects.extend(load_file(path))
    return objects


def load_file(path: Path) -> list[SourcedObject]:
    text = _read(path)
    objects: list[SourcedObject] = []
    try:
        for index, doc in enumerate(_documents(path, text), start=1):
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


def _read(path: Path) -> str:
    """The file's text; reads no more than the size limit, whatever the file claims."""
    try:
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SourceError(f"{path}: not a regular file")
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise SourceError(
                f"{path}: larger than {MAX_FILE_BYTES} bytes, the limit for a configuration "
                "file: split it into several files"
            )
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read: {e}") from None


def _documents(path: Path, text: str) -> Iterator[object]:
    """Each document of ``text``, built only after its expanded size has been checked."""
    loader = _Loader(text)
    budget = MAX_EXPANDED_SIZE
    # Without an alias (spelt "*name") a file holds only what it spells out: a few nodes
    # per character of at most MAX_FILE_BYTES, no bomb, so the walk (a third of a file's
    # load) is skipped.
    aliases = "*" in text
    try:
        index = 0
        while loader.check_node() and (node := loader.get_node()) is not None:
            index += 1
            if aliases:
                budget -= _expanded_size(path, node, budget)
            try:
                yield loader.construct_document(node)
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                raise SourceError(f"{path}#{index}: cannot load: {quote(str(e))}") from None
    finally:
        loader.dispose()


def _expanded_size(path: Path, root: yaml.Node, budget: int) -> int:
    """Nodes plus scalar characters of ``root`` with every alias written out.

    Iterative, and each distinct node is visited once: shared subtrees are added up, not
    walked again. Raises :class:`SourceError` when over ``budget`` or for a recursive alias.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if not children_done and id(node) in sizes:
            continue
        children = _children(node)
        if not children_done and children:
            if id(node) in open_nodes:
                raise SourceError(f"{path}:{_line(node)}: a YAML alias refers to itself")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children)
            continue
        open_nodes.discard(id(node))
        size = 1 + sum(sizes[id(child)] for child in children)
        if isinstance(node, yaml.ScalarNode):
            size += len(node.value)
        if size > budget:
            raise SourceError(
                f"{path}:{_line(node)}: the file expands to more than {MAX_EXPANDED_SIZE} "
                "nodes and characters here (the limit for a file, YAML aliases written out)"
            )
        sizes[id(node)] = size
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1 if node.start_mark is not None else 0


class DirectoryWatcher:
    """Feeds the directory's objects to ``apply`` at start and after every change.

    ``apply`` raising :class:`ConfigError` rejects that update: the error is logged once
    and the caller's last good configuration stays until the files change again. Any other
    exception is a bug, logged with its traceback; it must not end the watching either.
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
        self.rejected = 0  # updates refused (a metric)
        self._files: dict[str, tuple[tuple[int, int], list[SourcedObject]]] = {}

    def load_once(self) -> None:
        """Load and apply now; errors propagate (used at startup, where there is no last good)."""
        stamp = fingerprint(self._root)
        self._apply(self._load(stamp))
        self._seen = stamp

    def _load(self, stamp: Fingerprint) -> list[SourcedObject]:
        """Every object, parsing again only the files whose (mtime, size) changed: an edit
        in a directory of 10,000 objects costs one file's parse, and the unchanged files'
        objects stay the same mappings (which lets translation reuse its work)."""
        files: dict[str, tuple[tuple[int, int], list[SourcedObject]]] = {}
        objects: list[SourcedObject] = []
        for path, mtime_ns, size in stamp:
            cached = self._files.get(path)
            if cached is None or cached[0] != (mtime_ns, size):
                cached = ((mtime_ns, size), load_file(Path(path)))
            files[path] = cached
            objects.extend(cached[1])
        self._files = files
        return objects

    async def run(self) -> None:
        events = DirectoryEvents.open()
        try:
            while True:
                events = await self._rescan(events)
                if events is None:
                    await asyncio.sleep(self._interval)
                else:
                    await events.changed(BACKSTOP_INTERVAL)
        finally:
            if events is not None:
                events.close()

    async def _rescan(self, events: DirectoryEvents | None) -> DirectoryEvents | None:
        """Apply what changed since the last scan; the events to wait on next (None: poll).
        A directory newly watched wakes the next wait at once: what changed in it between
        the scan and its watch is seen by the next scan."""
        try:
            watch, stamp = await asyncio.to_thread(_scan, self._root)
            if events is not None and not events.watch(watch):
                events.close()
                events = None
            if stamp == self._seen:
                return events
            self._seen = stamp
            objects = await asyncio.to_thread(self._load, stamp)
            self._apply(objects)
        except ConfigError as e:
            self.rejected += 1
            log.error("configuration rejected, keeping the last good one: %s", e)
        except Exception:
            self.rejected += 1
            log.exception("configuration update failed (a bug), keeping the last good one")
        return events
