"""Size checks on the raw HTTP/2 byte stream, made as bytes arrive.

h2 buffers a whole frame, and a whole header block (HEADERS + up to 64 CONTINUATION
frames), before it checks a size, so a peer announcing a 16 MiB frame would make us hold
16 MiB. The guard reads only the 9-byte frame headers and refuses an oversized frame or
header block before its payload is buffered. h2 stays authoritative for everything else.
"""

from __future__ import annotations

from h2.errors import ErrorCodes

CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = 9
_HEADERS, _SETTINGS, _PUSH_PROMISE, _CONTINUATION = 0x1, 0x4, 0x5, 0x9
_END_HEADERS = 0x4
_ACK = 0x1


class FrameViolation(Exception):
    """The peer broke a limit; the connection must end with GOAWAY `error_code`."""

    def __init__(self, error_code: ErrorCodes, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code


class FrameGuard:
    """Follows frame boundaries of one direction of a connection without copying payloads."""

    def __init__(self, *, server: bool, max_frame_size: int, max_header_block: int) -> None:
        self._preface = CLIENT_PREFACE if server else b""
        self._max_frame_size = max_frame_size
        self._max_header_block = max_header_block
        self._settings_seen = False
        self._payload_left = 0
        self._frame_length = 0
        self._partial_header = b""
        # Encoded bytes of the header block under way, None between blocks.
        self._header_block: int | None = None

    @property
    def in_header_block(self) -> bool:
        return self._header_block is not None

    @property
    def incomplete(self) -> int:
        """How many of the bytes fed so far belong to a frame whose end has not arrived."""
        if self._payload_left:
            return _FRAME_HEADER + self._frame_length - self._payload_left
        return len(self._partial_header)

    def feed(self, data: bytes | memoryview) -> None:
        """Account for `data`; raises `FrameViolation` at the first header breaking a limit."""
        pos, end = 0, len(data)
        if self._preface:
            pos = min(len(self._preface), end)
            if data[:pos] != self._preface[:pos]:
                raise FrameViolation(ErrorCodes.PROTOCOL_ERROR, "not an HTTP/2 client preface")
            self._preface = self._preface[pos:]
        while pos < end:
            if self._payload_left:
                step = min(self._payload_left, end - pos)
                self._payload_left -= step
                pos += step
            elif self._partial_header or end - pos < _FRAME_HEADER:
                take = _FRAME_HEADER - len(self._partial_header)
                self._partial_header += data[pos : pos + take]
                pos += take
                if len(self._partial_header) == _FRAME_HEADER:
                    header, self._partial_header = self._partial_header, b""
                    self._frame(header, 0)
            else:
                self._frame(data, pos)
                pos += _FRAME_HEADER

    def _frame(self, buf: bytes | memoryview, at: int) -> None:
        length = buf[at] << 16 | buf[at + 1] << 8 | buf[at + 2]
        kind, flags = buf[at + 3], buf[at + 4]
        if not self._settings_seen:
            if kind != _SETTINGS or flags & _ACK:
                raise FrameViolation(
                    ErrorCodes.PROTOCOL_ERROR,
                    f"connection preface must continue with SETTINGS, got frame type {kind}",
                )
            self._settings_seen = True
        if length > self._max_frame_size:
            raise FrameViolation(
                ErrorCodes.FRAME_SIZE_ERROR,
                f"frame of {length} bytes announced, limit is {self._max_frame_size}",
            )
        if kind in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
            block = length + (self._header_block or 0) if kind == _CONTINUATION else length
            if block > self._max_header_block:
                raise FrameViolation(
                    ErrorCodes.ENHANCE_YOUR_CALM,
                    f"header block of over {self._max_header_block} bytes",
                )
            self._header_block = None if flags & _END_HEADERS else block
        self._payload_left = self._frame_length = length
