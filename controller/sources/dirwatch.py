"""Wake-ups when a configuration directory may have changed, from Linux inotify.

The watch only says *when* to look: the files source still compares every file's (mtime,
size) to decide *what* changed, so an event it does not care about costs one stat pass,
and an event missed by a rule here is no worse than ignoring it. Watched: every directory
the source walks, and the directory each file really lives in (a ConfigMap volume's files
are symlinks into a ``..<timestamp>`` directory swapped by renaming ``..data``). Not
watched: ``IN_MODIFY``, which fires for every ``write()`` of a file still being written;
its ``IN_CLOSE_WRITE`` comes when the writer is done.

``inotify_simple`` is a ctypes wrapper of the three system calls with no dependencies:
the controller needs a file descriptor to hand to the event loop, not a framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import inotify_simple  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

_F = inotify_simple.flags
MASK = (
    _F.CLOSE_WRITE
    | _F.CREATE
    | _F.DELETE
    | _F.MOVED_FROM
    | _F.MOVED_TO
    | _F.ATTRIB
    | _F.DELETE_SELF
    | _F.MOVE_SELF
)
SETTLE = 0.01  # after the first event, for the rest of a burst (a git checkout, a copy)


class DirectoryEvents:
    """An inotify instance watching a set of directories; :meth:`open` or None."""

    def __init__(self, inotify: inotify_simple.INotify) -> None:
        self._inotify = inotify
        self._watches: dict[str, int] = {}
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def open(cls) -> DirectoryEvents | None:
        """None, with the reason logged, where inotify is unavailable (not Linux, or the
        per-user instance limit reached): the caller then polls."""
        try:
            return cls(inotify_simple.INotify(nonblocking=True))
        except OSError as e:
            log.warning("cannot watch the configuration directory (%s); polling it instead", e)
            return None

    def watch(self, directories: Iterable[str]) -> bool:
        """Watch exactly ``directories`` from now on; False (logged) if one cannot be
        watched, e.g. ``fs.inotify.max_user_watches`` reached: the caller then polls."""
        wanted = set(directories)
        for path in self._watches.keys() - wanted:
            wd = self._watches.pop(path)
            if wd not in self._watches.values():  # two paths to one directory share a wd
                with contextlib.suppress(OSError):  # already gone with its directory
                    self._inotify.rm_watch(wd)
        for path in wanted - self._watches.keys():
            try:
                self._watches[path] = self._inotify.add_watch(path, MASK)
            except FileNotFoundError:  # removed since it was listed: the next scan sees it
                continue
            except OSError as e:
                log.warning("cannot watch %s (%s); polling the configuration instead", path, e)
                return False
            # What changed in it between the caller's scan and now raised no event: scan again.
            self._event.set()
        return True

    async def changed(self, timeout: float) -> None:
        """Return once an event arrived (and the burst it starts settled), or after
        ``timeout`` s without one."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._inotify.fileno(), self._readable)
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return
        await asyncio.sleep(SETTLE)
        self._event.clear()
        self._drain()

    def _readable(self) -> None:
        self._drain()
        self._event.set()

    def _drain(self) -> None:
        """Read every pending event; forget the watches the kernel dropped (their
        directory was deleted), so a directory made again at that path is watched anew."""
        with contextlib.suppress(BlockingIOError):
            while events := self._inotify.read(timeout=0):
                gone = {e.wd for e in events if e.mask & _F.IGNORED}
                for path in [p for p, wd in self._watches.items() if wd in gone]:
                    del self._watches[path]

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._inotify.fileno())
        self._inotify.close()
