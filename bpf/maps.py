"""Python views of the maps in ``src/maps.h``: ctypes structures named like the C fields.

A privileged test compares every structure here with the layout bcc derives from the C
(``Table.Key``/``Table.Leaf``), and a unit test compares ``COUNTERS`` with the C enum, so
neither side can drift alone.
"""

from __future__ import annotations

import ctypes
import socket
import struct


class OrigDst(ctypes.Structure):
    """``struct orig_dst``: an original destination, both fields in network byte order."""

    _fields_ = (
        ("ip4", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    )

    @property
    def address(self) -> tuple[str, int]:
        return socket.inet_ntoa(struct.pack("=I", self.ip4)), socket.ntohs(self.port)


class PeerKey(ctypes.Structure):
    """``struct peer_key``: a redirected client (netns cookie, IPv4, port; network order)."""

    _fields_ = (
        ("netns_cookie", ctypes.c_uint64),
        ("ip4", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    )


class FastpathKey(ctypes.Structure):
    """``struct fastpath_key``: a TCP socket as it sees itself (addresses network order,
    ports host order). ztunnel/fastpath.py has its own copy; a unit test compares them."""

    _fields_ = (
        ("netns_cookie", ctypes.c_uint64),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("remote_port", ctypes.c_uint32),
    )


class FastpathBytes(ctypes.Structure):
    """``struct fastpath_bytes``: what an app socket sent through TCP / straight to its pair."""

    _fields_ = (
        ("passed", ctypes.c_uint64),
        ("redirected", ctypes.c_uint64),
        ("to_tcp", ctypes.c_uint64),
        ("cookie", ctypes.c_uint64),
        ("ingress", ctypes.c_uint64),
    )


class FastpathPair(ctypes.Structure):
    """``struct fastpath_pair``: where a socket's bytes go once ``relayed`` equals its passed."""

    _fields_ = (("target", FastpathKey), ("relayed", ctypes.c_uint64), ("peer", FastpathKey))


class FastpathFlow(ctypes.Structure):
    """``struct fastpath_flow``: what an app socket read, and the corrections of its sends."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in (
            "read",
            "excess_passed",
            "excess_kernel",
            "call",
            "thread",
            "last",
            "token",
            "tainted",
        )
    )


# Per map: (key type, value type), in C's terms.
LAYOUTS: dict[str, tuple[type[ctypes._CData], type[ctypes._CData]]] = {
    "orig_dst_by_cookie": (ctypes.c_uint64, OrigDst),
    "orig_dst_by_peer": (PeerKey, OrigDst),
    "enrolled_pods": (ctypes.c_uint32, ctypes.c_uint8),
    "excluded_ports": (ctypes.c_uint16, ctypes.c_uint8),
    "counters": (ctypes.c_uint32, ctypes.c_uint64),
    "fastpath_bytes": (FastpathKey, FastpathBytes),
    "fastpath_pairs": (FastpathKey, FastpathPair),
    "fastpath_config": (ctypes.c_uint32, ctypes.c_uint32),
    "fastpath_read": (ctypes.c_uint64, FastpathFlow),
}

# ``enum ambimesh_counter`` in order: index in the ``counters`` per-CPU array -> name.
COUNTERS: tuple[str, ...] = (
    "outbound_redirected",
    "outbound_established",
    "original_dst_answered",
    "inbound_steered",
    "inbound_dropped",
)


def ip4_key(address: str) -> int:
    """An IPv4 address as the u32 the programs see (network byte order in memory)."""
    try:
        packed = socket.inet_aton(address)
    except OSError as exc:
        raise ValueError(f"not an IPv4 address: {address!r}") from exc
    if socket.inet_ntoa(packed) != address:
        raise ValueError(f"not a dotted-quad IPv4 address: {address!r}")
    value: int = struct.unpack("=I", packed)[0]
    return value
