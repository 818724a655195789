"""mesh/log_format.py: the date text made once per second, and every line as
logging.Formatter writes it; lines written without a record are the same bytes."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.log_format import InfoLines, SecondCachedFormatter
from mesh.logfile import RotatingLog

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def record(created: float) -> logging.LogRecord:
    rec = logging.LogRecord("ztunnel.access", logging.INFO, "", 0, "inbound %s", ("x",), None)
    rec.created = created
    rec.msecs = (created - int(created)) * 1000
    return rec


def test_lines_match_the_standard_formatter_across_seconds() -> None:
    cached, standard = SecondCachedFormatter(FORMAT), logging.Formatter(FORMAT)
    start = 1_764_680_000.0
    # Back and forth over second boundaries, as records of several threads may come.
    for offset in (0.0, 0.001, 0.999, 1.0, 0.5, 2.25, 61.75, 1.5, 3600.125):
        rec = record(start + offset)
        assert cached.format(rec) == standard.format(rec)


def test_the_date_text_is_made_once_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    real = time.strftime

    def counted(fmt: str, t: time.struct_time) -> str:
        made.append(fmt)
        return real(fmt, t)

    formatter = SecondCachedFormatter(FORMAT)
    monkeypatch.setattr(time, "strftime", counted)
    for created in (100.0, 100.2, 100.9, 101.0, 101.5):
        formatter.format(record(created))
    assert len(made) == 2


def test_an_explicit_date_format_is_the_standard_one() -> None:
    rec = record(1_764_680_000.25)
    assert SecondCachedFormatter(FORMAT).formatTime(rec, "%H") == logging.Formatter(
        FORMAT
    ).formatTime(rec, "%H")


@pytest.fixture
def access_logger() -> Iterator[logging.Logger]:
    """A logger of its own that does not propagate."""
    logger = logging.getLogger("test.log_format.access")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    yield logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.filters.clear()


def only(logger: logging.Logger, handler: logging.Handler) -> None:
    """``handler`` as the logger's one handler (pytest adds its capture handlers to
    loggers that do not propagate for each test phase)."""
    logger.handlers = [handler]


def no_records(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> logging.LogRecord:
        raise AssertionError("a LogRecord was made")

    monkeypatch.setattr(logging.Logger, "makeRecord", refuse)


@pytest.mark.parametrize("fmt", [FORMAT, "%(levelname)s %(message)s", "%(name)s|%(message)s"])
def test_direct_lines_are_the_lines_logging_writes_to_a_stream(
    access_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SecondCachedFormatter(fmt))
    only(access_logger, handler)
    for now in (1_764_680_000.0, 1_764_680_000.999, 1_764_680_001.5005):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        access_logger.info("%s", "outbound complete src.addr=10.0.0.1:4000 é")
        with monkeypatch.context() as patched:
            no_records(patched)
            InfoLines(access_logger).info("outbound complete src.addr=10.0.0.1:4000 é")
    lines = stream.getvalue().splitlines(keepends=True)
    assert len(lines) == 6
    assert lines[0::2] == lines[1::2]


def test_direct_lines_go_through_a_rotating_log(
    access_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    handler = RotatingLog(tmp_path / "z.log", max_bytes=200, backups=1)
    handler.setFormatter(SecondCachedFormatter(FORMAT))
    only(access_logger, handler)
    monkeypatch.setattr(time, "time", lambda: 1_764_680_000.25)
    access_logger.info("%s", "x" * 40)
    no_records(monkeypatch)
    InfoLines(access_logger).info("x" * 40)
    InfoLines(access_logger).info("y" * 40)  # past max_bytes: rotated as a record would be
    rotated = (tmp_path / "z.log.1").read_text().splitlines()
    assert len(rotated) == 2 and rotated[0] == rotated[1]
    assert (tmp_path / "z.log").read_text().endswith("y" * 40 + "\n")


def test_other_setups_get_ordinary_records(
    access_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    lines = InfoLines(access_logger)
    access_logger.propagate = True
    caplog.set_level(logging.INFO, logger=access_logger.name)
    lines.info("seen by the capture handler")  # a StreamHandler subclass
    assert caplog.records[-1].getMessage() == "seen by the capture handler"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SecondCachedFormatter("%(asctime)s %(process)d %(message)s"))
    access_logger.propagate = False
    only(access_logger, handler)
    lines.info("with a field only a record has")
    assert f" {os.getpid()} with a field only a record has" in stream.getvalue()
    access_logger.addFilter(lambda record: "secret" not in record.getMessage())
    lines.info("a secret")
    assert "secret" not in stream.getvalue()
    access_logger.setLevel(logging.WARNING)
    lines.info("below the level")
    assert "below the level" not in stream.getvalue()
