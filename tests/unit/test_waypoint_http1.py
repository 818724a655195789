"""waypoint.http1 byte for byte: requests split anywhere, keep-alive and pipelining,
chunked bodies with trailers, upgrades, HEAD and interim responses, limits, and what we
write (heads, chunks, trailers)."""

from __future__ import annotations

import gc
import weakref

import pytest

from waypoint.http1 import (
    MAX_HEAD_BYTES,
    Data,
    End,
    Event,
    H1Error,
    H1Parser,
    RequestHead,
    ResponseHead,
    Upgraded,
    encode_chunk,
    encode_last_chunk,
    encode_request_head,
    encode_response_head,
)

PIPELINED = (
    b"POST /a?x=1 HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Checksum: 9\r\n\r\n"
    b"GET /b HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n"
)


def feed_split(parser: H1Parser, data: bytes, size: int) -> list[Event]:
    events: list[Event] = []
    for i in range(0, len(data), size):
        events += parser.feed(data[i : i + size])
    return events


def merged(events: list[Event]) -> list[Event]:
    """Adjacent Data events joined (how bytes were split must not matter)."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + event.data)
        else:
            out.append(event)
    return out


@pytest.mark.parametrize("size", [1, 2, 7, 64, len(PIPELINED)])
def test_pipelined_chunked_then_close_split_anywhere(size: int) -> None:
    events = merged(feed_split(H1Parser(requests=True), PIPELINED, size))
    first, body, end, second, end2 = events
    assert isinstance(first, RequestHead)
    assert (first.method, first.target, first.version) == ("POST", "/a?x=1", "1.1")
    assert first.keep_alive and not first.upgrade
    assert ("transfer-encoding", "chunked") in first.headers
    assert body == Data(b"abcde")
    assert end == End([("x-checksum", "9")])
    assert isinstance(second, RequestHead) and not second.keep_alive
    assert end2 == End([])


def test_http10_defaults_to_close_and_content_length_body() -> None:
    events = H1Parser(requests=True).feed(b"PUT / HTTP/1.0\r\nContent-Length: 4\r\n\r\nabcd")
    head = events[0]
    assert isinstance(head, RequestHead) and head.version == "1.0" and not head.keep_alive
    assert events[1:] == [Data(b"abcd"), End([])]


def test_upgrade_hands_back_the_bytes_after_the_head() -> None:
    parser = H1Parser(requests=True)
    events = parser.feed(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05"
    )
    assert isinstance(events[0], RequestHead) and events[0].upgrade
    assert events[-1] == Upgraded(b"\x81\x05")
    with pytest.raises(H1Error):
        parser.feed(b"more")


def test_malformed_and_oversized_heads_are_errors() -> None:
    with pytest.raises(H1Error) as bad:
        H1Parser(requests=True).feed(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    assert bad.value.status == 400
    huge = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    with pytest.raises(H1Error) as big:
        feed_split(H1Parser(requests=True), huge, 4096)
    assert big.value.status == 431
    with pytest.raises(H1Error):  # smuggling shape: both framings
        H1Parser(requests=True).feed(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )


def test_interim_response_then_final() -> None:
    events = H1Parser(requests=False).feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )
    statuses = [e.status for e in events if isinstance(e, ResponseHead)]
    assert statuses == [100, 201]
    assert events[-2:] == [Data(b"ok"), End([])]


def test_head_response_has_no_body_whatever_content_length_says() -> None:
    parser = H1Parser(requests=False)
    parser.expect_head_response()
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert isinstance(events[0], ResponseHead) and events[1:] == [End()]
    assert not parser.in_message


def test_close_delimited_response_ends_at_eof_and_truncation_is_an_error() -> None:
    parser = H1Parser(requests=False)
    events = parser.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc")
    assert events[1:] == [Data(b"abc")]
    assert parser.eof() == [End()]
    truncated = H1Parser(requests=False)
    truncated.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    with pytest.raises(H1Error) as cut:
        truncated.eof()
    assert cut.value.status == 502
    assert H1Parser(requests=True).eof() == []  # between messages: a clean close


def test_encoders() -> None:
    assert encode_request_head("GET", "/p?q", [("host", "h"), ("x", "1")]) == (
        b"GET /p?q HTTP/1.1\r\nhost: h\r\nx: 1\r\n\r\n"
    )
    assert encode_response_head(404, []) == b"HTTP/1.1 404 Not Found\r\n\r\n"
    assert encode_chunk(b"hello world!!!!!") == b"10\r\nhello world!!!!!\r\n"
    assert encode_last_chunk() == b"0\r\n\r\n"
    assert encode_last_chunk([("grpc-status", "0")]) == b"0\r\ngrpc-status: 0\r\n\r\n"


@pytest.mark.parametrize(
    "header", [("x", "a\r\nInjected: 1"), ("x", "a\nb"), ("bad name", "v"), ("x", "\x00")]
)
def test_header_injection_is_refused(header: tuple[str, str]) -> None:
    with pytest.raises(H1Error):
        encode_response_head(200, [header])


@pytest.mark.parametrize(
    ("requests", "data"),
    [
        (True, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
        (False, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
    ],
)
def test_a_parser_is_freed_without_the_garbage_collector(requests: bool, data: bytes) -> None:
    """No reference cycle: one parser per upstream exchange must not wait for gc."""
    gc.disable()
    try:
        parser = H1Parser(requests=requests)
        assert parser.feed(data)
        ref = weakref.ref(parser)
        del parser
        assert ref() is None
    finally:
        gc.enable()
