"""Sockets for a pod's app connections, made ahead in the pod's netns.

Making a socket inside a pod's netns costs two `setns` and the namespace lock on top of
the socket itself: 35-42 µs against 15-18 µs without, on every inbound connection. A
socket keeps the netns it was made in, so it can be made early and connected later from
the loop's own namespace: `UpstreamSockets` makes them a batch at a time with one `setns`
pair, after the callbacks of the loop iteration that used the last one, and closes the
spare ones with the pod (each holds the pod's netns alive). With the options of every
upstream socket (`UPSTREAM_OPTIONS`), a spare socket holds no port until its `connect`.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from mesh.netns import Netns, NetnsClosed, sockets_in
from ztunnel.sockets import UPSTREAM_OPTIONS

log = logging.getLogger(__name__)

# A pod that had an inbound connection keeps up to this many spare fds; 4 already takes
# 3/4 of the setns cost off each socket.
BATCH = 4


class UpstreamSockets:
    """Unconnected, non-blocking TCP sockets of one netns, bound to one source address
    (or not bound). At most ``batch`` are kept; none before the first is taken."""

    def __init__(self, netns: Netns, source: str | None, batch: int = BATCH) -> None:
        if batch < 1:
            raise ValueError(f"an upstream socket batch needs at least one socket, got {batch}")
        self._netns = netns
        self._bind = (source, 0) if source else None
        self._batch = batch
        self._spare: list[socket.socket] = []
        self._refill_due = False
        self.closed = False

    def take(self) -> socket.socket:
        """A fresh socket, the caller's to connect and close. Raises `NetnsClosed` once
        the pool (or the netns) is closed, or the OSError of making one."""
        if self.closed:
            raise NetnsClosed(f"network namespace {self._netns.name} was released")
        if not self._spare:
            self._spare = self._make()
        sock = self._spare.pop()
        if not self._spare and not self._refill_due:
            self._refill_due = True
            asyncio.get_running_loop().call_soon(self._refill)
        return sock

    @property
    def spare(self) -> int:
        return len(self._spare)

    def close(self) -> None:
        """Close the spare sockets; later `take` calls fail. Taken sockets are the takers'."""
        self.closed = True
        spare, self._spare = self._spare, []
        for sock in spare:
            sock.close()

    def _make(self) -> list[socket.socket]:
        return sockets_in(self._netns, self._batch, bind=self._bind, options=UPSTREAM_OPTIONS)

    def _refill(self) -> None:
        self._refill_due = False
        if self.closed or self._spare:
            return
        try:
            self._spare = self._make()
        except OSError as exc:
            # The next take makes them itself and hands the error to its connection.
            log.debug("upstream sockets in %s not made ahead: %s", self._netns.name, exc)
