"""The pure HBONE rules: CONNECT headers, authorities, statuses."""

from __future__ import annotations

import pytest

from mesh.hbone.protocol import (
    ConnectRequest,
    HboneProtocolError,
    HboneStreamRefused,
    RawHeader,
    Status,
    build_connect_request,
    build_response,
    describe_status,
    format_authority,
    is_success,
    parse_authority,
    parse_connect_request,
    parse_response_status,
)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80)),
        ("198.18.3.4:65535", ("198.18.3.4", 65535)),
        ("[fd00::1]:8080", ("fd00::1", 8080)),
        ("[::ffff:10.0.0.1]:1", ("::ffff:10.0.0.1", 1)),
    ],
)
def test_parse_authority_accepts(authority: str, expected: tuple[str, int]) -> None:
    assert parse_authority(authority) == expected
    assert format_authority(*expected) == authority


@pytest.mark.parametrize(
    ("authority", "message"),
    [
        ("", "empty"),
        ("10.0.0.1", "no port"),
        ("10.0.0.1:", "invalid port"),
        ("10.0.0.1:0", "out of range"),
        ("10.0.0.1:65536", "out of range"),
        ("10.0.0.1:123456", "invalid port"),
        ("10.0.0.1:+80", "invalid port"),
        ("10.0.0.1:\uff18\uff10", "invalid port"),  # fullwidth digits
        ("10.0.0.256:80", "not an IP"),
        ("example.com:80", "not an IP"),
        ("fd00::1:80", "ambiguous"),
        ("[fd00::1]", "malformed IPv6"),
        ("[fd00::1:80", "malformed IPv6"),
        ("[10.0.0.1]:80", "IPv6"),
        ("[zz::1]:80", "IPv6"),
    ],
)
def test_parse_authority_rejects(authority: str, message: str) -> None:
    with pytest.raises(HboneProtocolError, match=message):
        parse_authority(authority)


@pytest.mark.parametrize(
    ("authority", "ok"),
    [("reviews.default.svc.cluster.local:9080", True), ("bad_host:80", False), ("-x:1", False)],
)
def test_hostnames_only_when_allowed(authority: str, ok: bool) -> None:
    with pytest.raises(HboneProtocolError):
        parse_authority(authority)
    if ok:
        assert parse_authority(authority, allow_hostname=True)[1] > 0
    else:
        with pytest.raises(HboneProtocolError):
            parse_authority(authority, allow_hostname=True)


def test_build_connect_request_is_classic_connect() -> None:
    headers = build_connect_request("10.0.0.1:80", [("baggage", "k=v")])
    assert headers == [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), ("baggage", "k=v")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((":path", "/"), "pseudo-headers"),
        (("Baggage", "x"), "lowercase"),
        (("connection", "close"), "connection-specific"),
        (("forwarded", "a\r\nb"), "CR, LF"),
        (("baggage", " k=v"), "whitespace"),
        (("baggage", "k=v\t"), "whitespace"),
    ],
)
def test_build_connect_request_rejects_bad_extra_headers(
    extra: tuple[str, str], message: str
) -> None:
    with pytest.raises(HboneProtocolError, match=message):
        build_connect_request("10.0.0.1:80", [extra])


def test_build_connect_request_rejects_bad_authority() -> None:
    with pytest.raises(HboneProtocolError, match="no port"):
        build_connect_request("10.0.0.1")


def test_round_trip_through_parser() -> None:
    headers = build_connect_request("[fd00::2]:443", [("forwarded", "for=10.0.0.9")])
    request = parse_connect_request(headers)
    assert request == ConnectRequest("fd00::2", 443, (("forwarded", "for=10.0.0.9"),))
    assert request.authority == "[fd00::2]:443"
    assert request.header("Forwarded") == "for=10.0.0.9"
    assert request.header("baggage") is None


def test_parse_accepts_bytes_and_lowercases_names() -> None:
    request = parse_connect_request(
        [(b":method", b"CONNECT"), (b":authority", b"10.1.2.3:9"), (b"X-Id", b"7")]
    )
    assert request == ConnectRequest("10.1.2.3", 9, (("x-id", "7"),))


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([(":method", "GET"), (":authority", "10.0.0.1:80")], "only CONNECT"),
        ([(":authority", "10.0.0.1:80")], "only CONNECT"),
        ([(":method", "CONNECT")], "without :authority"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1")], "no port"),
        ([(":method", "CONNECT"), (":authority", "nope:80")], "not an IP"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:99999")], "out of range"),
        (
            [(":method", "CONNECT"), (":authority", "10.0.0.1:80"), (":path", "/")],
            "must not carry :path",
        ),
        (
            [(":method", "CONNECT"), (":method", "CONNECT"), (":authority", "10.0.0.1:80")],
            "duplicate",
        ),
        ([(b":method", b"CONNECT"), (b":authority", b"\xff:80")], "UTF-8"),
    ],
)
def test_parse_connect_request_rejects(headers: list[RawHeader], message: str) -> None:
    with pytest.raises(HboneProtocolError, match=message):
        parse_connect_request(headers)


@pytest.mark.parametrize(
    ("status", "success", "description"),
    [
        (Status.OK, True, "established"),
        (Status.BAD_REQUEST, False, "malformed"),
        (Status.UNAUTHENTICATED, False, "identity"),
        (Status.POLICY_DENIED, False, "policy"),
        (Status.UPSTREAM_UNREACHABLE, False, "unreachable"),
        (Status.UPSTREAM_TIMEOUT, False, "timed out"),
        (418, False, "unexpected"),
    ],
)
def test_status_table(status: int, success: bool, description: str) -> None:
    assert is_success(status) is success
    assert description in describe_status(status)
    assert parse_response_status(build_response(status)) == status


def test_refused_error_says_why() -> None:
    error = HboneStreamRefused(403, "10.0.0.1:80")
    assert error.status == 403
    assert "10.0.0.1:80" in str(error)
    assert "authorization policy" in str(error)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([], "exactly one"),
        ([(":status", "200"), (":status", "200")], "exactly one"),
        ([(":status", "2000")], "malformed"),
        ([(":status", "ok")], "malformed"),
    ],
)
def test_parse_response_status_rejects(headers: list[RawHeader], message: str) -> None:
    with pytest.raises(HboneProtocolError, match=message):
        parse_response_status(headers)


@pytest.mark.parametrize("status", [100, 199, 600])
def test_build_response_requires_final_status(status: int) -> None:
    with pytest.raises(HboneProtocolError, match="final"):
        build_response(status)
