"""``Discovery.Stream``: the full snapshot on connect, then one delta per new version.

The stream is lock-step per node: the next version goes out only after the node has
ACKed or NACKed the previous one, and every delta is computed from the last version the
node ACKed. So a NACKed update never leaves the node out of step: the next delta simply
carries everything it still lacks, and changes made while a node is busy coalesce.

Nodes share their responses: a version's full snapshot, and the delta between two
versions, are built and serialized once (:class:`Encoder`) and the same bytes go to every
node that needs them, so a change costs one diff however many nodes there are, and 1000
nodes connecting cost one snapshot's memory, not 1000 (bench/controller_scale.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from controller.auth import AuthError, NodeAuthenticator
from controller.metrics import ControllerMetrics
from controller.store import Snapshot, Store, diff
from mesh.api import mesh_pb2

log = logging.getLogger(__name__)


@dataclass
class NodeStatus:
    """What the controller knows about one node's configuration, for logs and debugging."""

    connected: int = 0
    sent_version: str = ""
    acked_version: str = ""
    nacked_version: str = ""
    error_detail: str = ""


class _Reply(NamedTuple):
    version: str
    error_detail: str


class _Newer:
    """Queued to a stream when the store has a new version."""


NEWER = _Newer()


class Inbox(asyncio.Queue[_Reply | _Newer | None]):
    """A stream's events: the node's answers, None when it is gone, and :data:`NEWER`, at
    most once in the queue (a stuck node's inbox does not grow with every version)."""

    newer_queued = False

    def announce(self) -> None:
        if not self.newer_queued:
            self.newer_queued = True
            self.put_nowait(NEWER)

    async def next(self) -> _Reply | _Newer | None:
        event = await self.get()
        if event is NEWER:
            self.newer_queued = False
        return event


Context = grpc.aio.ServicerContext[mesh_pb2.DiscoveryRequest, bytes]
SERVICE = "ambimesh.v1.Discovery"
DELTAS_KEPT = 16


class Encoder:
    """Serialized responses by version: the current full snapshot and the last
    :data:`DELTAS_KEPT` deltas (nodes a version or two behind share them too)."""

    def __init__(self) -> None:
        self._full: tuple[Snapshot, bytes] | None = None
        self._deltas: OrderedDict[tuple[int, int], bytes] = OrderedDict()

    def full(self, snapshot: Snapshot) -> bytes:
        if self._full is None or self._full[0] is not snapshot:
            self._full = (snapshot, _response(None, snapshot).SerializeToString())
        return self._full[1]

    def delta(self, base: Snapshot, new: Snapshot) -> bytes:
        key = (base.serial, new.serial)
        data = self._deltas.get(key)
        if data is None:
            data = self._deltas[key] = _response(base, new).SerializeToString()
            while len(self._deltas) > DELTAS_KEPT:
                self._deltas.popitem(last=False)
        else:
            self._deltas.move_to_end(key)
        return data

    def encode(self, base: Snapshot | None, new: Snapshot) -> bytes:
        return self.full(new) if base is None else self.delta(base, new)


def _serialize(response: bytes) -> bytes:
    return response


def add_to_server(service: DiscoveryService, server: grpc.aio.Server) -> None:
    """Registers ``service`` like the generated ``add_DiscoveryServicer_to_server``, but its
    stream writes responses already serialized (shared between nodes), sent as they are."""
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            service.Stream,
            request_deserializer=mesh_pb2.DiscoveryRequest.FromString,
            response_serializer=_serialize,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class DiscoveryService:
    """The ``Discovery`` service; its stream writes serialized responses, so it is registered
    with :func:`add_to_server`, not the generated servicer base.

    The stream writes with ``context.write`` and reads with ``context.read``, not by
    yielding responses and iterating the requests: grpc.aio's generator and iterator add an
    async generator step per message, 2000 per relabel at 1000 nodes."""

    def __init__(
        self,
        store: Store,
        authenticator: NodeAuthenticator,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        self._store = store
        self._auth = authenticator
        self.metrics = metrics or ControllerMetrics()
        self._encoder = Encoder()
        self.nodes: dict[str, NodeStatus] = {}
        self._readers: set[asyncio.Task[str | None]] = set()
        self._inboxes: set[Inbox] = set()
        self._announcer: asyncio.Task[None] | None = None
        self._closing = False

    def connected_streams(self) -> int:
        """Read by the metrics thread: list() copies the values under the GIL, so a node
        joining meanwhile cannot break the iteration."""
        return sum(status.connected for status in list(self.nodes.values()))

    def close(self) -> None:
        """End every stream normally, so a shutting-down server has none to cancel (gRPC logs
        each cancelled handler as an error) and nodes reconnect to the next controller."""
        self._closing = True
        for reader in self._readers:
            reader.cancel()
        if self._announcer is not None:
            self._announcer.cancel()

    async def _announce(self) -> None:
        """Tell every stream about each new version: one wait on the store for all of them,
        where a wait per stream cost 1000 futures and callbacks per change."""
        serial = self._store.current.serial
        while True:
            serial = (await self._store.wait_newer(serial)).serial
            for inbox in self._inboxes:
                inbox.announce()

    async def Stream(
        self, request_iterator: AsyncIterator[mesh_pb2.DiscoveryRequest], context: Context
    ) -> None:
        """Writes serialized ``DiscoveryResponse`` messages (see :func:`add_to_server`)."""
        try:
            node = (await self._auth.authenticate(context.invocation_metadata() or ())).node
        except AuthError as e:
            log.warning("push stream from %s refused: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the controller is shutting down")
        status = self.nodes.setdefault(node, NodeStatus())
        status.connected += 1
        if self._announcer is None:
            self._announcer = asyncio.create_task(self._announce())
        replies = Inbox()
        self._inboxes.add(replies)
        reader = asyncio.create_task(_read(node, context, replies))
        self._readers.add(reader)
        log.info("node %s connected (%s)", node, context.peer())
        try:
            await self._push(node, status, replies, context)
            if reader.done() and not reader.cancelled() and (mismatch := reader.result()):
                log.warning("push stream: %s", mismatch)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, mismatch)
        finally:
            reader.cancel()
            self._readers.discard(reader)
            self._inboxes.discard(replies)
            status.connected -= 1
            log.info("node %s disconnected", node)

    async def _push(self, node: str, status: NodeStatus, replies: Inbox, context: Context) -> None:
        """Send, wait for the answer, wait for a newer version; until the node goes away
        (its reader ends and queues None). ``replies`` carries the node's answers and
        :data:`NEWER`, so a stream waits on one queue and nothing else. Every ACK but the
        stream's first (a node connecting applies no change) is a convergence time."""
        acked: Snapshot | None = None
        sent = self._store.current
        counts, convergence = self.metrics.push, self.metrics.convergence
        while True:
            await context.write(self._encoder.encode(acked, sent))
            counts.pushes += 1
            status.sent_version = sent.version
            while (reply := await replies.next()) is not None:
                if isinstance(reply, _Reply):
                    if reply.version == sent.version:
                        break
                    log.debug("node %s answered stale version %s", node, reply.version)
            if reply is None:
                return
            if reply.error_detail:
                counts.rejects += 1
                status.nacked_version, status.error_detail = reply.version, reply.error_detail
                log.warning(
                    "node %s rejected version %s: %s", node, reply.version, reply.error_detail
                )
            else:
                if acked is not None:
                    convergence.observe(time.monotonic() - sent.published)
                acked, status.acked_version = sent, sent.version
                log.debug("node %s applied version %s", node, sent.version)
            while self._store.current.serial <= sent.serial:
                if (event := await replies.next()) is None:
                    return
                if isinstance(event, _Reply):
                    log.debug("node %s answered stale version %s", node, event.version)
            sent = self._store.current


async def _read(node: str, context: Context, replies: Inbox) -> str | None:
    """Queue the node's ACK/NACKs; the result is why the stream must end, if not its end."""
    try:
        # Anything else is grpc.aio.EOF (the stubs type read() as the request alone).
        while isinstance(request := await context.read(), mesh_pb2.DiscoveryRequest):
            if request.node and request.node != node:
                return f"authenticated as node {node} but the request names node {request.node}"
            if request.version:
                replies.put_nowait(_Reply(request.version, request.error_detail))
        return None
    finally:
        replies.put_nowait(None)


def _response(base: Snapshot | None, new: Snapshot) -> mesh_pb2.DiscoveryResponse:
    if base is None:
        return mesh_pb2.DiscoveryResponse(
            version=new.version,
            full=True,
            resources=[new.resources[k] for k in sorted(new.resources)],
        )
    delta = diff(base, new)
    return mesh_pb2.DiscoveryResponse(
        version=new.version, full=False, resources=delta.changed, removed=delta.removed
    )
