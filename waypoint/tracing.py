"""W3C Trace Context at the waypoint: continue the caller's trace when its ``traceparent``
is valid, start one when it is missing or malformed, and hand the next hop a
``traceparent`` naming the waypoint's span as parent, as Envoy's tracers do.

Sampling follows the caller's ``sampled`` flag; a trace started here is sampled with
Istio's default probability (meshConfig ``defaultConfig.tracing.sampling``: 1 %).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
DEFAULT_SAMPLING_PERCENT = 1.0
VERSION = "00"
_SAMPLED = 0x01
_LENGTH = 55  # "00-" + 32 + "-" + 16 + "-" + 2
_HEX = re.compile(r"[0-9a-f]+")
_ids = random.SystemRandom()


@dataclass(frozen=True)
class TraceContext:
    trace_id: str  # 32 lower-case hex digits, never all zero
    span_id: str  # 16 hex digits: the span this context describes (the waypoint's own)
    parent_id: str | None  # the caller's span; None when the trace started here
    sampled: bool
    tracestate: str | None = None  # passed on unchanged, as W3C asks

    @classmethod
    def from_headers(
        cls,
        headers: Mapping[str, str],
        rng: random.Random | None = None,
        sampling_percent: float = DEFAULT_SAMPLING_PERCENT,
    ) -> TraceContext:
        """The waypoint's span for a request with these (lower-case) headers."""
        rng = rng or _ids
        parsed = parse_traceparent(headers.get(TRACEPARENT))
        if parsed is None:  # W3C: without a valid traceparent, tracestate is dropped too
            sampled = rng.random() * 100.0 < sampling_percent
            return cls(_new_id(rng, 128), _new_id(rng, 64), None, sampled)
        trace_id, parent_id, sampled = parsed
        return cls(trace_id, _new_id(rng, 64), parent_id, sampled, headers.get(TRACESTATE))

    def child(self, rng: random.Random | None = None) -> TraceContext:
        """A span under this one (an upstream attempt), same trace and sampling."""
        return replace(self, span_id=_new_id(rng or _ids, 64), parent_id=self.span_id)

    def traceparent(self) -> str:
        """This span as the next hop's parent, always in version 00."""
        flags = _SAMPLED if self.sampled else 0
        return f"{VERSION}-{self.trace_id}-{self.span_id}-{flags:02x}"

    def headers(self) -> dict[str, str]:
        """What to set on the upstream request."""
        out = {TRACEPARENT: self.traceparent()}
        if self.tracestate:
            out[TRACESTATE] = self.tracestate
        return out


def parse_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent id, sampled), or None when ``value`` is not a valid traceparent:
    version ff, a length other than 55 for version 00 (a later version may append
    ``-``-separated fields), upper-case or non-hex digits, an all-zero id."""
    if value is None:
        return None
    value = value.strip(" \t")
    if len(value) < _LENGTH or (value[2], value[35], value[52]) != ("-", "-", "-"):
        return None
    version, trace_id, parent_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if not all(_HEX.fullmatch(part) for part in (version, trace_id, parent_id, flags)):
        return None
    if version == "ff" or (version == VERSION and len(value) != _LENGTH):
        return None
    if len(value) > _LENGTH and value[_LENGTH] != "-":
        return None
    if int(trace_id, 16) == 0 or int(parent_id, 16) == 0:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & _SAMPLED)


def _new_id(rng: random.Random, bits: int) -> str:
    value = 0
    while value == 0:
        value = rng.getrandbits(bits)
    return f"{value:0{bits // 4}x}"
