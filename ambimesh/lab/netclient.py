"""Talking to a lab address from the lab tool itself, through a socket made in a namespace."""

from __future__ import annotations

import http.client
import socket

from mesh.netns import Netns, socket_in


def connect_in(netns_name: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    with Netns.open(f"/var/run/netns/{netns_name}") as ns:
        sock = socket_in(ns, reuse=False)
    sock.setblocking(True)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def http_get(
    netns_name: str, host: str, port: int, path: str, timeout: float = 5.0
) -> tuple[int, str]:
    """GET ``path`` from host:port as seen from inside ``netns_name``; (status, body)."""
    return http_get_over(connect_in(netns_name, host, port, timeout), host, port, path, timeout)


def http_get_over(
    sock: socket.socket, host: str, port: int, path: str, timeout: float = 5.0
) -> tuple[int, str]:
    """GET ``path`` over ``sock``, already connected to host:port (wherever it was made);
    (status, body). The socket is closed after."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()
