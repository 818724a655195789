"""The node side of ``Discovery.Stream``: keeps the full resource map in step with the
controller, from a daemon thread with synchronous gRPC.

Synchronous gRPC in its own thread keeps the client independent of the caller's event
loop (ztunnel runs uvloop, which grpc.aio does not support). ``on_update`` runs on that
thread: a caller with a loop hands the new state over with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import grpc

from mesh.api import mesh_pb2, mesh_pb2_grpc
from mesh.keepalive import KEEPALIVE, Keepalive

log = logging.getLogger(__name__)

OnUpdate = Callable[[str, Mapping[str, mesh_pb2.Resource]], None]


class ConfigRejected(Exception):
    """Raised by ``on_update`` to NACK a version; the message goes back to the controller."""


class PushClient:
    """Streams configuration from the controller; reconnects with bounded backoff.

    Every version is ACKed once ``on_update`` returns, or NACKed when it raises (the
    previous state stays). After a reconnect the controller's snapshot replaces the state.
    ``on_connected`` runs (on this thread) once per stream, after its first response: the
    controller answers again, so whatever waited for it (certificate renewals) can go.
    """

    def __init__(
        self,
        target: str,
        root_cert_pem: bytes,
        token: str | Callable[[], str],
        node: str,
        on_update: OnUpdate,
        *,
        on_connected: Callable[[], None] | None = None,
        initial_backoff: float = 0.5,
        max_backoff: float = 15.0,
        keepalive: Keepalive = KEEPALIVE,
    ) -> None:
        self._target = target
        self._credentials = grpc.ssl_channel_credentials(root_certificates=root_cert_pem)
        # A callable is asked at every (re)connect: a rotated token is picked up.
        self._token = token if callable(token) else lambda: token
        self._node = node
        self._on_update = on_update
        self._on_connected = on_connected
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._channel_options = keepalive.client_options()
        self._state: dict[str, mesh_pb2.Resource] = {}
        self._version = ""
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._call: Any = None
        self._thread: threading.Thread | None = None

    @property
    def version(self) -> str:
        """The last version applied (ACKed), empty before the first."""
        return self._version

    @property
    def resources(self) -> Mapping[str, mesh_pb2.Resource]:
        return MappingProxyType(self._state)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("PushClient.start() called twice")
        self._thread = threading.Thread(target=self._run, name=f"push-{self._node}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_synced(self, timeout: float) -> bool:
        """True once a configuration has been applied (at least once since start)."""
        return self._synced.wait(timeout)

    def _run(self) -> None:
        delay = self._initial_backoff
        while not self._stopping.is_set():
            applied_before = self._synced.is_set()
            try:
                self._stream_once()
                log.warning("controller %s closed the push stream; reconnecting", self._target)
            except grpc.RpcError as e:
                if self._stopping.is_set():
                    break
                log.warning(
                    "push stream to %s failed: %s: %s%s",
                    self._target,
                    e.code().name,
                    e.details(),
                    " (check this node's join token)"
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED
                    else "",
                )
            except Exception:
                log.exception("push client for node %s failed; reconnecting", self._node)
            if self._synced.is_set() and not applied_before:
                delay = self._initial_backoff
            self._stopping.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._max_backoff)

    def _stream_once(self) -> None:
        outbox: queue.Queue[mesh_pb2.DiscoveryRequest | None] = queue.Queue()
        outbox.put(mesh_pb2.DiscoveryRequest(node=self._node))

        def requests() -> Iterator[mesh_pb2.DiscoveryRequest]:
            while (item := outbox.get()) is not None:
                yield item

        with grpc.secure_channel(self._target, self._credentials, self._channel_options) as channel:
            stub = mesh_pb2_grpc.DiscoveryStub(channel)
            metadata = (("authorization", f"Bearer {self._token()}"),)
            call = stub.Stream(requests(), metadata=metadata)
            with self._lock:
                self._call = call
            if self._stopping.is_set():
                call.cancel()
            try:
                for n, response in enumerate(call):
                    outbox.put(self._apply(response))
                    if n == 0:
                        self._connected()
            finally:
                outbox.put(None)
                with self._lock:
                    self._call = None

    def _connected(self) -> None:
        log.info("push stream to %s up (config version %s)", self._target, self._version)
        if self._on_connected is None:
            return
        try:
            self._on_connected()
        except Exception:  # a bug in the hook must not cost the config stream
            log.exception("on_connected hook failed")

    def _apply(self, response: mesh_pb2.DiscoveryResponse) -> mesh_pb2.DiscoveryRequest:
        if response.full:
            state = {r.key: r for r in response.resources}
        else:
            state = dict(self._state)
            for key in response.removed:
                state.pop(key, None)
            state.update((r.key, r) for r in response.resources)
        try:
            self._on_update(response.version, MappingProxyType(state))
        except ConfigRejected as e:
            log.warning("rejected configuration version %s: %s", response.version, e)
            return self._reply(response.version, str(e) or "rejected")
        except Exception as e:
            log.exception("applying configuration version %s failed", response.version)
            return self._reply(response.version, f"internal error applying the update: {e!r}")
        self._state, self._version = state, response.version
        self._synced.set()
        return self._reply(response.version, "")

    def _reply(self, version: str, error: str) -> mesh_pb2.DiscoveryRequest:
        return mesh_pb2.DiscoveryRequest(node=self._node, version=version, error_detail=error)
