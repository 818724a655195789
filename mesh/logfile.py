"""A size-capped log file for a proxy's log (most of it the per-connection access lines).

ztunnel writes ~400 bytes per connection on each node; to stderr, that is bounded by
whoever collects it (kubelet rotates container logs, journald caps itself), but a file
the process was started with (the lab, a bare host) grows without end. `RotatingLog`
caps it: past `max_bytes` the file becomes `<path>.1` (older ones move up to
`<path>.<backups>`, the oldest is dropped), so the node keeps at most
`(backups + 1) * max_bytes` (see `RotatingLog` for what several writers add).

Each line is one `write` on an O_APPEND descriptor, as the stderr handler it replaces, so
lines are visible at once and whole even with several writers. Several processes (ztunnel
workers) may share one path: rotation happens under a lock file, the size is re-read from
the file at least every `max_bytes / 16` bytes a process wrote, and a process whose file
another one rotated reopens the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from argparse import ArgumentParser, ArgumentTypeError, Namespace
from pathlib import Path

from mesh.log_format import SecondCachedFormatter

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 3
# A process re-reads the file's size after writing this share of max_bytes itself.
_CHECK_SHARE = 16
_CALLER_FIELDS = ("pathname", "filename", "module", "funcName", "lineno", "stack_info")


class RotatingLog(logging.Handler):
    """Log records to `path`, rotated by size. One writer keeps every file within
    `max_bytes` (a single longer line aside); each further process writing the same path
    may add up to `max_bytes / 16` before the file's size is checked again."""

    def __init__(
        self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS
    ) -> None:
        if max_bytes <= 0 or backups < 1:
            raise ValueError("a rotated log needs max_bytes > 0 and at least one backup")
        super().__init__()
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._check_every = max(1, max_bytes // _CHECK_SHARE)
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._unchecked = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:
            self.handleError(record)

    def write_line(self, text: str) -> None:
        """Write one formatted line (also `mesh.log_format.InfoLines`, without a record)."""
        line = (text + "\n").encode("utf-8", "backslashreplace")
        if self._size + len(line) > self.max_bytes or self._unchecked >= self._check_every:
            self._follow()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate(len(line))
        os.write(self._fd, line)
        self._size += len(line)
        self._unchecked += len(line)

    def close(self) -> None:
        with self.lock or contextlib.nullcontext():
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        super().close()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _follow(self) -> None:
        """The file's real size; reopen the path first if another process rotated it."""
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            moved = True
        if moved:
            os.close(self._fd)
            self._fd = self._open()
        self._size = os.fstat(self._fd).st_size
        self._unchecked = 0

    def _rotate(self, incoming: int) -> None:
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._follow()  # rotated by another process while we waited?
            if not self._size or self._size + incoming <= self.max_bytes:
                return
            for n in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
            os.close(self._fd)
            self._fd = self._open()
            self._size = 0


def add_log_file_flags(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--log-file",
        type=Path,
        help="write the log (access lines included) to this file, rotated by size, instead "
        "of stderr (where the container runtime or journald bounds it)",
    )
    parser.add_argument(
        "--log-max-bytes",
        type=_positive,
        default=DEFAULT_MAX_BYTES,
        help=f"rotate --log-file past this size (default {DEFAULT_MAX_BYTES})",
    )
    parser.add_argument(
        "--log-backups",
        type=_positive,
        default=DEFAULT_BACKUPS,
        help=f"rotated files kept, <file>.1 the newest (default {DEFAULT_BACKUPS})",
    )


def collect_only_shown_fields(fmt: str) -> None:
    """Record fields `fmt` does not show are not collected (the logging HOWTO's
    "Optimization"): the caller's file and line cost a stack walk per record, the process
    and thread a few calls more, together over half the cost of an access-log line."""
    if not any(f"%({name})" in fmt for name in _CALLER_FIELDS):
        logging._srcfile = None
    logging.logThreads = "%(thread" in fmt
    logging.logProcesses = "%(process)" in fmt
    logging.logMultiprocessing = "%(processName)" in fmt


def configure_logging(args: Namespace, fmt: str) -> None:
    """The root logger to stderr, or to `--log-file` with rotation; only the record
    fields `fmt` shows are collected."""
    collect_only_shown_fields(fmt)
    handler: logging.Handler
    if args.log_file is None:
        handler = logging.StreamHandler()  # stderr, as basicConfig's own
    else:
        handler = RotatingLog(args.log_file, max_bytes=args.log_max_bytes, backups=args.log_backups)
    handler.setFormatter(SecondCachedFormatter(fmt))
    logging.basicConfig(level=args.log_level, handlers=[handler])


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise ArgumentTypeError(f"expected a positive number, got {text!r}")
    return int(text)
