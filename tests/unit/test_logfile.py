"""mesh/logfile.py: the log file stays within its cap, across rotations and processes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.logfile import RotatingLog, add_log_file_flags, configure_logging

LINE = "x" * 99  # 100 bytes with the newline


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("test.logfile")
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def _files(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in path.parent.glob(path.name + "*")}


def test_rotation_caps_the_files_and_keeps_the_newest_lines(
    tmp_path: Path, logger: logging.Logger
) -> None:
    path = tmp_path / "ztunnel.log"
    logger.addHandler(RotatingLog(path, max_bytes=1000, backups=2))
    for n in range(200):
        logger.info("%s %03d", LINE[:95], n)
    files = _files(path)
    assert set(files) == {"ztunnel.log", "ztunnel.log.1", "ztunnel.log.2", "ztunnel.log.lock"}
    assert all(size <= 1000 for name, size in files.items())
    lines = [
        line
        for name in ("ztunnel.log.2", "ztunnel.log.1", "ztunnel.log")
        for line in (tmp_path / name).read_text().splitlines()
    ]
    # The newest lines, in order, with nothing lost between the files.
    numbers = [int(line.rsplit(" ", 1)[1]) for line in lines]
    assert numbers == list(range(200 - len(numbers), 200))
    assert len(numbers) >= 20


def test_each_line_is_written_at_once(tmp_path: Path, logger: logging.Logger) -> None:
    path = tmp_path / "access.log"
    logger.addHandler(RotatingLog(path, max_bytes=1 << 20, backups=1))
    logger.info("one connection")
    assert path.read_text() == "one connection\n"


def test_writers_sharing_the_file_rotate_it_once_and_stay_within_the_cap(
    tmp_path: Path,
) -> None:
    """Workers of one ztunnel log to the same path (here three handlers, each with its own
    descriptor and counts as a process would have, taking turns line by line): each rotation
    happens once, a writer follows a file another one rotated, and the size is re-read often
    enough that each other writer adds at most max_bytes / 16 and a line."""
    path = tmp_path / "shared.log"
    writers = [RotatingLog(path, max_bytes=2000, backups=3) for _ in range(3)]
    for writer in writers:
        writer.setFormatter(logging.Formatter("%(message)s"))
    for n in range(600):
        record = logging.LogRecord("p", logging.INFO, __file__, 0, f"{n:04d} {LINE}", (), None)
        writers[n % 3].handle(record)
    for writer in writers:
        writer.close()
    files = _files(path)
    assert set(files) == {"shared.log", *(f"shared.log.{n}" for n in (1, 2, 3)), "shared.log.lock"}
    assert all(size <= 2000 + 2 * (2000 // 16 + 105) for size in files.values())
    kept = sorted(
        int(line.split()[0])
        for name in files
        for line in (tmp_path / name).read_text().splitlines()
    )
    # Rotation dropped only old lines: the three rotated files are full of the newest ones.
    assert kept[-1] == 599
    assert len(kept) >= 3 * (2000 // 105)
    assert kept[0] >= 600 - len(kept) - 6


def test_flags_select_the_rotated_file(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--log-level", default="INFO")
    add_log_file_flags(parser)
    args = parser.parse_args(["--log-file", str(tmp_path / "z.log"), "--log-max-bytes", "4096"])
    root = logging.getLogger()
    before = list(root.handlers)
    collected = (logging._srcfile, logging.logThreads, logging.logProcesses)
    for handler in before:
        root.removeHandler(handler)
    try:
        configure_logging(args, "%(levelname)s %(message)s")
        (handler,) = root.handlers
        assert isinstance(handler, RotatingLog)
        assert (handler.max_bytes, handler.backups) == (4096, 3)
        logging.getLogger("ztunnel.access").warning("outbound complete")
        # Fields the format does not show are not collected.
        assert (logging._srcfile, logging.logThreads, logging.logProcesses) == (None, False, False)
        configure_logging(args, "%(process)d %(message)s")
        assert logging.logProcesses
        assert (tmp_path / "z.log").read_text() == "WARNING outbound complete\n"
    finally:
        logging._srcfile, logging.logThreads, logging.logProcesses = collected
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in before:
            root.addHandler(handler)
    with pytest.raises(SystemExit):
        parser.parse_args(["--log-backups", "0"])
