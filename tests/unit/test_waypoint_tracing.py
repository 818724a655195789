"""W3C traceparent parsing, continuation and generation (waypoint/tracing.py), including
malformed inputs from the W3C test suite's categories."""

from __future__ import annotations

import random

import pytest

from waypoint.tracing import TraceContext, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALID, (TRACE, PARENT, True)),
        (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
        (f"00-{TRACE}-{PARENT}-03", (TRACE, PARENT, True)),  # other flag bits: still sampled
        (f"00-{TRACE}-{PARENT}-02", (TRACE, PARENT, False)),
        (f" {VALID}\t", (TRACE, PARENT, True)),  # optional whitespace around the value
        (f"01-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),  # a later version
        (f"cc-{TRACE}-{PARENT}-01-what-the-future-holds", (TRACE, PARENT, True)),
    ],
)
def test_valid(value: str, expected: tuple[str, str, bool]) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "garbage",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE}-{PARENT}-0",
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper case hex
        f"00-{TRACE}-{PARENT.upper()}-01",
        f"0G-{TRACE}-{PARENT}-01",
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE[:-1]}x-{PARENT}-01",
        f"00_{TRACE}_{PARENT}_01",
        f"00-{TRACE}-{PARENT}-0x",
        f"01-{TRACE}-{PARENT}-01x",  # a later version's extra fields start with "-"
        f"00-{TRACE}{PARENT}-01-----",
    ],
)
def test_malformed(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_continue_a_valid_trace() -> None:
    headers = {"traceparent": VALID, "tracestate": "vendor=abc"}
    ctx = TraceContext.from_headers(headers, random.Random(1))
    assert (ctx.trace_id, ctx.parent_id, ctx.sampled) == (TRACE, PARENT, True)
    assert ctx.span_id not in (PARENT, "0" * 16)
    assert ctx.traceparent() == f"00-{TRACE}-{ctx.span_id}-01"
    assert ctx.headers() == {"traceparent": ctx.traceparent(), "tracestate": "vendor=abc"}
    assert parse_traceparent(ctx.traceparent()) == (TRACE, ctx.span_id, True)


def test_not_sampled_stays_not_sampled() -> None:
    ctx = TraceContext.from_headers({"traceparent": f"00-{TRACE}-{PARENT}-00"}, random.Random(2))
    assert not ctx.sampled
    assert ctx.traceparent().endswith("-00")


def test_later_version_is_continued_as_version_00() -> None:
    ctx = TraceContext.from_headers({"traceparent": f"cc-{TRACE}-{PARENT}-01-x"})
    assert ctx.traceparent().startswith(f"00-{TRACE}-")
    assert len(ctx.traceparent()) == 55


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"traceparent": "junk", "tracestate": "vendor=abc"},
        {"traceparent": f"ff-{TRACE}-{PARENT}-01"},
    ],
)
def test_missing_or_malformed_starts_a_new_trace(headers: dict[str, str]) -> None:
    ctx = TraceContext.from_headers(headers, random.Random(3), sampling_percent=100.0)
    assert ctx.parent_id is None
    assert ctx.trace_id != TRACE
    assert parse_traceparent(ctx.traceparent()) == (ctx.trace_id, ctx.span_id, True)
    assert ctx.tracestate is None  # dropped with the invalid traceparent


def test_new_traces_are_sampled_at_the_configured_rate() -> None:
    rng = random.Random(4)
    default = sum(TraceContext.from_headers({}, rng).sampled for _ in range(20_000))
    assert 140 <= default <= 260  # Istio's default 1 %
    never = [TraceContext.from_headers({}, rng, sampling_percent=0.0) for _ in range(100)]
    assert not any(c.sampled for c in never)


def test_child_spans_share_the_trace() -> None:
    rng = random.Random(5)
    ctx = TraceContext.from_headers({"traceparent": VALID, "tracestate": "a=1"}, rng)
    child = ctx.child(rng)
    assert (child.trace_id, child.parent_id, child.sampled) == (TRACE, ctx.span_id, True)
    assert child.span_id != ctx.span_id
    assert child.tracestate == "a=1"


def test_ids_are_lower_case_hex_of_the_right_length() -> None:
    rng = random.Random(6)
    for _ in range(200):
        ctx = TraceContext.from_headers({}, rng)
        assert len(ctx.trace_id) == 32 and len(ctx.span_id) == 16
        assert parse_traceparent(ctx.traceparent()) is not None
