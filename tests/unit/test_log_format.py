"""mesh/log_format.py: the date text made once per second, and every line as
logging.Formatter writes it."""

from __future__ import annotations

import logging
import time

import pytest

from mesh.log_format import SecondCachedFormatter

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
