"""HBONE wire rules without I/O: CONNECT request headers, their validation, response statuses.

A classic HTTP/2 CONNECT (RFC 9113 §8.5) carries only `:method` and `:authority`; the
authority is the original destination `ip:port` (IPv6 in brackets).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

Header = tuple[str, str]
RawHeader = tuple[str | bytes, str | bytes]

HBONE_PORT = 15008

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*$"
)
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")
# Hop-by-hop headers are forbidden in HTTP/2 (RFC 9113 §8.2.2).
_FORBIDDEN = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}
)


class HboneError(Exception):
    """Base of every HBONE error."""


class HboneProtocolError(HboneError):
    """A CONNECT request or response that breaks the HBONE rules."""


class HboneStreamRefused(HboneError):
    """The peer answered our CONNECT with a non-2xx status."""

    def __init__(self, status: int, authority: str = "") -> None:
        self.status = status
        self.authority = authority
        target = f" to {authority}" if authority else ""
        super().__init__(
            f"peer refused the tunnel{target} with {status} ({describe_status(status)})"
        )


class Status(IntEnum):
    """The statuses an HBONE server answers with, and why."""

    OK = 200
    BAD_REQUEST = 400
    UNAUTHENTICATED = 401
    POLICY_DENIED = 403
    UPSTREAM_UNREACHABLE = 503
    UPSTREAM_TIMEOUT = 504


_DESCRIPTIONS = {
    Status.OK: "tunnel established",
    Status.BAD_REQUEST: "malformed CONNECT request",
    Status.UNAUTHENTICATED: "peer identity not accepted",
    Status.POLICY_DENIED: "denied by authorization policy",
    Status.UPSTREAM_UNREACHABLE: "destination application unreachable",
    Status.UPSTREAM_TIMEOUT: "timed out connecting to the destination application",
}


def describe_status(status: int) -> str:
    try:
        return _DESCRIPTIONS[Status(status)]
    except (ValueError, KeyError):
        return "unexpected status"


def is_success(status: int) -> bool:
    return 200 <= status < 300


@dataclass(frozen=True)
class ConnectRequest:
    """A validated CONNECT: where the tunnel goes, and the non-pseudo headers sent with it."""

    authority_host: str
    authority_port: int
    headers: tuple[Header, ...] = ()

    @property
    def authority(self) -> str:
        return format_authority(self.authority_host, self.authority_port)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), if present."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_authority(authority: str, *, allow_hostname: bool = False) -> tuple[str, int]:
    """Split `ip:port` (`[v6]:port`); an IP is required unless `allow_hostname`."""
    if not authority:
        raise HboneProtocolError("CONNECT :authority is empty; it must be the destination ip:port")
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise HboneProtocolError(f"malformed IPv6 :authority {authority!r}; expected [ip]:port")
        port_text = rest[1:]
        if not _is_ip(host, version=6):
            raise HboneProtocolError(f":authority {authority!r} does not hold an IPv6 address")
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep:
            raise HboneProtocolError(f":authority {authority!r} has no port; expected ip:port")
        if ":" in host:
            raise HboneProtocolError(
                f":authority {authority!r} is ambiguous; write IPv6 as [addr]:port"
            )
        if not _is_ip(host, version=4) and not (allow_hostname and _HOSTNAME.match(host)):
            wanted = "an IP address or host name" if allow_hostname else "an IP address"
            raise HboneProtocolError(f":authority host {host!r} is not {wanted}")
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise HboneProtocolError(f":authority {authority!r} has an invalid port {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise HboneProtocolError(f":authority {authority!r} port {port} is out of range 1-65535")
    return host, port


@functools.lru_cache(maxsize=4096)
def _is_ip(text: str, *, version: int) -> bool:
    """Cached: a tunnel's authority is parsed up to three times, and peers repeat."""
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _check_extra_headers(headers: Iterable[Header]) -> tuple[Header, ...]:
    checked = []
    for name, value in headers:
        if name.startswith(":"):
            raise HboneProtocolError(f"extra header {name!r}: pseudo-headers are set by HBONE")
        if not _TOKEN.match(name):
            raise HboneProtocolError(f"header name {name!r} must be a lowercase HTTP token")
        if name in _FORBIDDEN:
            raise HboneProtocolError(
                f"header {name!r} is connection-specific, not allowed in HTTP/2"
            )
        if any(c in value for c in "\r\n\0"):
            raise HboneProtocolError(f"header {name!r} value contains CR, LF or NUL")
        if value != value.strip(" \t"):
            raise HboneProtocolError(f"header {name!r} value starts or ends with whitespace")
        checked.append((name, value))
    return tuple(checked)


def build_connect_request(
    authority: str, extra_headers: Iterable[Header] = (), *, allow_hostname: bool = False
) -> list[Header]:
    """The header block for an HBONE CONNECT to `authority`."""
    parse_authority(authority, allow_hostname=allow_hostname)
    return [(":method", "CONNECT"), (":authority", authority), *_check_extra_headers(extra_headers)]


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HboneProtocolError(f"header is not valid UTF-8: {value!r}") from exc
    return value


def parse_connect_request(
    headers: Iterable[RawHeader], *, allow_hostname: bool = False
) -> ConnectRequest:
    """Validate a received request header block as an HBONE CONNECT."""
    pseudo: dict[str, str] = {}
    regular: list[Header] = []
    for raw_name, raw_value in headers:
        name, value = _text(raw_name), _text(raw_value)
        if name.startswith(":"):
            if name in pseudo:
                raise HboneProtocolError(f"duplicate pseudo-header {name}")
            pseudo[name] = value
        else:
            regular.append((name.lower(), value))
    method = pseudo.pop(":method", None)
    if method != "CONNECT":
        raise HboneProtocolError(f"HBONE accepts only CONNECT, got method {method!r}")
    authority = pseudo.pop(":authority", None)
    if authority is None:
        raise HboneProtocolError("CONNECT without :authority; it must be the destination ip:port")
    if pseudo:
        raise HboneProtocolError(
            f"classic CONNECT must not carry {', '.join(sorted(pseudo))} (RFC 9113 §8.5)"
        )
    host, port = parse_authority(authority, allow_hostname=allow_hostname)
    return ConnectRequest(host, port, tuple(regular))


def build_response(status: int, extra_headers: Iterable[Header] = ()) -> list[Header]:
    if not 200 <= status <= 599:
        raise HboneProtocolError(f"status {status} is not a final HTTP status")
    return [(":status", str(status)), *_check_extra_headers(extra_headers)]


def parse_response_status(headers: Sequence[RawHeader]) -> int:
    """The `:status` of a received response header block."""
    statuses = [_text(value) for name, value in headers if _text(name) == ":status"]
    if len(statuses) != 1:
        raise HboneProtocolError(f"response must carry exactly one :status, got {len(statuses)}")
    text = statuses[0]
    if len(text) != 3 or not text.isascii() or not text.isdigit():
        raise HboneProtocolError(f"malformed :status {text!r}")
    return int(text)
