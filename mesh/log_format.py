"""Log lines without the per-record cost of `logging`, byte for byte as it writes them.

`SecondCachedFormatter`: the default `formatTime` runs `localtime` and `strftime` for
every record, 4-6 µs of the ~33 µs an access line cost ztunnel (one line per connection
on each side). The text only changes with the second, so it is kept with the second it
was made for and only the milliseconds are formatted per record. Output is identical to
`logging.Formatter`'s.

`InfoLines`: the access line through `logger.info` still made a `LogRecord` (~7 µs),
walked the handlers and formatted through the record's attribute dict. When the
logger's lines go to one plain handler (stderr's `StreamHandler`, or one with a
``write_line`` method such as `mesh.logfile.RotatingLog`) with a `SecondCachedFormatter`
whose format only shows the time, level, logger name and message, the line is made
from those four values and written under the handler's lock; any other setup (filters,
several handlers, a test's capture handler) gets an ordinary record.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from typing import TextIO

# The record fields a line made without a record can fill in.
_DIRECT_FIELDS = frozenset({"asctime", "levelname", "name", "message"})
_FIELD = re.compile(r"%\((\w+)\)")


class SecondCachedFormatter(logging.Formatter):
    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        # (second, its date text): one attribute, so a thread never pairs one's text
        # with another's second.
        self._cached: tuple[int, str] = (-1, "")
        self.direct = (
            type(self._style) is logging.PercentStyle
            and set(_FIELD.findall(self._fmt or "")) <= _DIRECT_FIELDS
        )
        self._uses_time = self.usesTime()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._date(record.created, record.msecs)

    def line(self, created: float, levelname: str, name: str, message: str) -> str:
        """What `format` makes of a record with these values and no exception or stack
        (only if ``direct``: the format shows no other field)."""
        msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord's
        values = {"levelname": levelname, "name": name, "message": message}
        if self._uses_time:
            values["asctime"] = self._date(created, msecs)
        return (self._fmt or "") % values

    def _date(self, created: float, msecs: float) -> str:
        second = int(created)
        cached_second, text = self._cached
        if second != cached_second:
            text = time.strftime(self.default_time_format, self.converter(second))
            self._cached = (second, text)
        msec_format = self.default_msec_format
        return msec_format % (text, msecs) if msec_format else text


class InfoLines:
    """A logger's INFO lines, written without a `LogRecord` when its setup allows (see
    the module's docstring); otherwise through the logger as usual."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def info(self, message: str) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        sink = _direct_sink(logger)
        if sink is None:
            logger.info("%s", message)
            return
        handler, formatter, write = sink
        text = formatter.line(time.time(), "INFO", logger.name, message)
        handler.acquire()
        try:
            write(text)
        except Exception:
            handler.handleError(
                logging.LogRecord(logger.name, logging.INFO, "", 0, message, None, None)
            )
        finally:
            handler.release()


def _direct_sink(
    logger: logging.Logger,
) -> tuple[logging.Handler, SecondCachedFormatter, Callable[[str], None]] | None:
    """The one handler ``logger``'s INFO records would reach, its formatter and how to
    write a formatted line to it; None if a record is needed."""
    found: logging.Handler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        for handler in current.handlers:
            if found is not None:
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    if found is None or found.filters or found.level > logging.INFO:
        return None
    formatter = found.formatter
    if type(formatter) is not SecondCachedFormatter or not formatter.direct:
        return None
    write_line = getattr(found, "write_line", None)
    if write_line is not None:
        return found, formatter, write_line
    if type(found) is logging.StreamHandler:
        return found, formatter, functools.partial(_write_stream, found)
    return None


def _write_stream(handler: logging.StreamHandler[TextIO], text: str) -> None:
    """As `StreamHandler.emit` writes a formatted record."""
    handler.stream.write(text + handler.terminator)
    handler.flush()
