"""FrameGuard on its own: frame boundaries across arbitrary read splits, exact limits."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes

from mesh.hbone.guard import CLIENT_PREFACE, FrameGuard, FrameViolation
from tests.unit.hbone_rig import frame_header

DATA, HEADERS, SETTINGS, CONTINUATION = 0x0, 0x1, 0x4, 0x9
END_HEADERS = 0x4
MAX_FRAME = 16384
MAX_BLOCK = 1000


def guard() -> FrameGuard:
    return FrameGuard(server=True, max_frame_size=MAX_FRAME, max_header_block=MAX_BLOCK)


def frame(kind: int, payload: bytes, flags: int = 0, stream_id: int = 1) -> bytes:
    return frame_header(len(payload), kind, flags, stream_id) + payload


SETTINGS_FRAME = frame(SETTINGS, b"\x00\x04\x00\x01\x00\x00", stream_id=0)
CONVERSATION = (
    CLIENT_PREFACE
    + SETTINGS_FRAME
    + frame(HEADERS, b"h" * 600)
    + frame(CONTINUATION, b"c" * 400, END_HEADERS)
    + frame(DATA, b"d" * MAX_FRAME)
)


@pytest.mark.parametrize("split", [1, 7, 9, 10, 4096, len(CONVERSATION)])
def test_valid_conversation_passes_whatever_the_reads(split: int) -> None:
    g = guard()
    for at in range(0, len(CONVERSATION), split):
        g.feed(CONVERSATION[at : at + split])
    assert not g.in_header_block


@pytest.mark.parametrize("split", [1, 5, 100])
def test_oversized_frame_found_from_a_split_header(split: int) -> None:
    g = guard()
    wire = CLIENT_PREFACE + SETTINGS_FRAME + frame_header(MAX_FRAME + 1, DATA, 0, 1)
    with pytest.raises(FrameViolation) as caught:
        for at in range(0, len(wire), split):
            g.feed(wire[at : at + split])
    assert caught.value.error_code == ErrorCodes.FRAME_SIZE_ERROR


def test_header_block_counted_across_continuations() -> None:
    g = guard()
    g.feed(CLIENT_PREFACE + SETTINGS_FRAME + frame(HEADERS, b"h" * 600))
    assert g.in_header_block
    g.feed(frame(CONTINUATION, b"c" * 300))
    with pytest.raises(FrameViolation) as caught:
        g.feed(frame(CONTINUATION, b"c" * 101))
    assert caught.value.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_wrong_preface_is_a_protocol_error() -> None:
    g = guard()
    g.feed(CLIENT_PREFACE[:10])
    with pytest.raises(FrameViolation) as caught:
        g.feed(b"GET / HTTP/1.1\r\n")
    assert caught.value.error_code == ErrorCodes.PROTOCOL_ERROR


def test_client_side_expects_the_servers_settings_first() -> None:
    g = FrameGuard(server=False, max_frame_size=MAX_FRAME, max_header_block=MAX_BLOCK)
    g.feed(SETTINGS_FRAME)
    with pytest.raises(FrameViolation):
        FrameGuard(server=False, max_frame_size=MAX_FRAME, max_header_block=MAX_BLOCK).feed(
            frame(DATA, b"x")
        )
