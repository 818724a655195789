"""Every bound an HBONE peer can push against, in one place.

Any holder of a mesh certificate can connect to 15008, so each resource a peer makes us
hold (buffers, streams, idle sockets) has a limit here, enforced as bytes arrive. See
ARCHITECTURE.md "Limits and deadlines" for what happens when each is exceeded.
"""

from __future__ import annotations

from dataclasses import dataclass

_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65535


@dataclass(frozen=True)
class HboneLimits:
    """Defaults fit a node's ztunnel; tests shorten the deadlines. Validated on creation."""

    # Receive windows: the most a peer may send us that nobody has read yet.
    stream_window: int = 4 * 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    # SETTINGS_MAX_FRAME_SIZE: a longer declared frame is refused from its 9-byte header.
    max_frame_size: int = 256 * 1024
    # SETTINGS_MAX_HEADER_LIST_SIZE: bounds a decoded header list and the encoded bytes
    # of one header block (HEADERS + CONTINUATION).
    max_header_list_size: int = 16 * 1024
    # SETTINGS_MAX_CONCURRENT_STREAMS: a stream beyond it gets RST_STREAM REFUSED_STREAM.
    max_concurrent_streams: int = 1000
    # A writer may queue this much on one stream before drain() waits.
    stream_send_buffer: int = 256 * 1024
    # Transport write buffer above which DATA stops (pause_writing) until the peer reads.
    write_high_water: int = 256 * 1024
    # Write buffer above which we stop reading the peer: it is not reading what it makes
    # us answer (PING, SETTINGS, RST_STREAM floods).
    write_buffer_limit: int = 1024 * 1024
    # Seconds. TLS handshake (applied by `serve`), client preface after TLS, one header
    # block, a server connection without streams, a pooled client connection without
    # streams (shorter than the server's so the client normally closes first), and the
    # flush of a closing connection before it is aborted.
    handshake_timeout: float = 10.0
    preface_timeout: float = 10.0
    headers_timeout: float = 10.0
    idle_timeout: float = 300.0
    client_idle_timeout: float = 120.0
    close_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 16384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError("max_frame_size must be within 16384..16777215 (RFC 9113 §6.5.2)")
        if not 0 < self.stream_window <= _MAX_WINDOW:
            raise ValueError(f"stream_window must be within 1..{_MAX_WINDOW}")
        if not _DEFAULT_WINDOW <= self.connection_window <= _MAX_WINDOW:
            raise ValueError(f"connection_window must be within {_DEFAULT_WINDOW}..{_MAX_WINDOW}")
        if self.write_buffer_limit <= self.write_high_water + self.max_frame_size:
            raise ValueError(
                "write_buffer_limit must exceed write_high_water + max_frame_size, "
                "or a peer that reads slowly but honestly would be stopped"
            )
        for name in (
            "max_header_list_size",
            "max_concurrent_streams",
            "stream_send_buffer",
            "handshake_timeout",
            "preface_timeout",
            "headers_timeout",
            "idle_timeout",
            "client_idle_timeout",
            "close_timeout",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


DEFAULT_LIMITS = HboneLimits()
