"""``Discovery.Stream``: the full snapshot on connect, then one delta per new version.

The stream is lock-step per node: the next version goes out only after the node has
ACKed or NACKed the previous one, and every delta is computed from the last version the
node ACKed. So a NACKed update never leaves the node out of step: the next delta simply
carries everything it still lacks, and changes made while a node is busy coalesce.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from controller.auth import AuthError, NodeAuthenticator
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


@dataclass(frozen=True)
class _Reply:
    version: str
    error_detail: str


class DiscoveryService:
    """Registered with ``mesh_pb2_grpc.add_DiscoveryServicer_to_server``."""

    def __init__(self, store: Store, authenticator: NodeAuthenticator) -> None:
        self._store = store
        self._auth = authenticator
        self.nodes: dict[str, NodeStatus] = {}

    async def Stream(
        self, request_iterator: AsyncIterator[mesh_pb2.DiscoveryRequest], context: Any
    ) -> None:
        try:
            node = self._auth.authenticate(context.invocation_metadata() or ())
        except AuthError as e:
            log.warning("push stream from %s refused: %s", context.peer(), e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            return
        status = self.nodes.setdefault(node, NodeStatus())
        status.connected += 1
        replies: asyncio.Queue[_Reply | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(node, request_iterator, replies, context))
        log.info("node %s connected (%s)", node, context.peer())
        try:
            await self._push(node, status, replies, context)
        finally:
            reader.cancel()
            status.connected -= 1
            log.info("node %s disconnected", node)

    async def _push(
        self,
        node: str,
        status: NodeStatus,
        replies: asyncio.Queue[_Reply | None],
        context: Any,
    ) -> None:
        acked: Snapshot | None = None
        sent = self._store.current
        await context.write(_response(None, sent))
        status.sent_version = sent.version
        while True:
            reply = await replies.get()
            if reply is None:
                return
            if reply.version != sent.version:
                log.debug("node %s answered stale version %s", node, reply.version)
                continue
            if reply.error_detail:
                status.nacked_version, status.error_detail = reply.version, reply.error_detail
                log.warning(
                    "node %s rejected version %s: %s", node, reply.version, reply.error_detail
                )
            else:
                acked, status.acked_version = sent, sent.version
                log.debug("node %s applied version %s", node, sent.version)
            sent = await self._store.wait_newer(sent.serial)
            await context.write(_response(acked, sent))
            status.sent_version = sent.version

    async def _read(
        self,
        node: str,
        requests: AsyncIterator[mesh_pb2.DiscoveryRequest],
        replies: asyncio.Queue[_Reply | None],
        context: Any,
    ) -> None:
        try:
            async for request in requests:
                if request.node and request.node != node:
                    message = (
                        f"authenticated as node {node} but the request names node {request.node}"
                    )
                    log.warning("push stream: %s", message)
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
                if request.version:
                    replies.put_nowait(_Reply(request.version, request.error_detail))
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
