"""Header lists as both HTTP versions carry them, and the edits a proxy makes: hop-by-hop
removal (RFC 9110 §7.6.1) and the route's mutations. Names are lower case throughout."""

from __future__ import annotations

from mesh.api import mesh_pb2

Headers = list[tuple[str, str]]

# Connection-specific: never forwarded, in either direction (HTTP/2 forbids them).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "host",
        "content-length",
        "expect",
        "http2-settings",
    }
)


def get(headers: Headers, name: str) -> str | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def joined(headers: Headers, name: str) -> str | None:
    """All values of `name` joined by "," (how a multi-valued header is matched)."""
    values = [v for n, v in headers if n == name]
    return ",".join(values) if values else None


def tokens(headers: Headers, name: str) -> set[str]:
    """The comma-separated tokens of `name`, lower case (Connection, TE, Upgrade)."""
    found: set[str] = set()
    for n, v in headers:
        if n == name:
            found.update(t.strip().lower() for t in v.split(","))
    found.discard("")
    return found


def end_to_end(headers: Headers) -> Headers:
    """`headers` without hop-by-hop ones, nor those the Connection header names. Framing
    (content-length, transfer-encoding) and Host are the connection code's to write."""
    named = tokens(headers, "connection")
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


def content_length(headers: Headers) -> int | None:
    value = get(headers, "content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def mutate(headers: Headers, mutation: mesh_pb2.HttpHeaderMutation) -> Headers:
    """Remove, then set (replace every value), then add (append); returns a new list."""
    if not (mutation.remove or mutation.set or mutation.add):
        return headers
    drop = {n.lower() for n in mutation.remove} | {n.lower() for n in mutation.set}
    out = [(n, v) for n, v in headers if n not in drop]
    out.extend((n.lower(), v) for n, v in sorted(mutation.set.items()))
    out.extend((n.lower(), v) for n, v in sorted(mutation.add.items()))
    return out
