"""What a tunnel carries, from its first bytes: HTTP/2 with prior knowledge, HTTP/1.x, or
anything else (relayed as TCP). Pure, so every boundary case is a table entry."""

from __future__ import annotations

import enum
import re

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# The longest request line we wait for before calling the bytes "not HTTP".
MAX_REQUEST_LINE = 8 * 1024
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/1\.[01]\r?\n")
_PARTIAL = re.compile(
    rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+( [^ \r\n]*( (H(T(T(P(/(1(\.([01]\r?)?)?)?)?)?)?)?)?)?)?"
)


class Protocol(enum.Enum):
    HTTP2 = "h2"
    HTTP1 = "http/1.1"
    TCP = "tcp"


def sniff(data: bytes) -> Protocol | None:
    """The protocol `data` (the first bytes of a tunnel) starts, None if more are needed."""
    if data.startswith(H2_PREFACE):
        return Protocol.HTTP2
    if H2_PREFACE.startswith(data):
        return None  # also the empty prefix
    newline = data.find(b"\n")
    if newline >= 0:
        return Protocol.HTTP1 if _REQUEST_LINE.fullmatch(data[: newline + 1]) else Protocol.TCP
    if len(data) < MAX_REQUEST_LINE and _PARTIAL.fullmatch(data):
        return None
    return Protocol.TCP
