"""The Kubernetes API as a configuration source: every kind translation reads, watched.

One :class:`~controller.sources.kubernetes_watch.Reflector` per kind keeps a local copy of
the cluster's objects; after a change, the source waits :data:`DEBOUNCE` seconds (a
rollout or a relabel is many events) and hands everything to ``apply`` at once, the same
``translate()`` the YAML directory feeds. So relabeling a namespace
(``kubectl label ns NAME ambimesh.io/dataplane-mode=ambient``) is one Namespace MODIFIED
event, one translation, and the namespace's pods are enrolled.

``apply`` raising :class:`ConfigError` rejects that state of the cluster: logged, the last
good configuration stays, and the next change is translated again (as the files source
does). Nothing is applied before every kind has been listed once, so the first
configuration is never a partial view of the cluster (pods without their namespaces).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from controller import (
    authz,
    destinationrule,
    endpoints,
    httproute,
    ratelimit,
    virtualservice,
    waypoints,
)
from controller.sources.kubernetes_api import KubeApi
from controller.sources.kubernetes_watch import Kind, Reflector
from controller.translate import PEER_AUTHENTICATION_API_VERSIONS, ConfigError, SourcedObject

log = logging.getLogger(__name__)

DEBOUNCE = 0.2
SOURCE = "kubernetes"

ReflectorFactory = Callable[[KubeApi, Kind, Callable[[], None]], Reflector]


def _newest_first(versions: Iterable[str]) -> tuple[str, ...]:
    """apiVersions as the server should be asked: GA before beta before alpha."""
    return tuple(sorted(versions, key=lambda v: ("alpha" in v, "beta" in v)))


KINDS: tuple[Kind, ...] = (
    Kind("Namespace", ("v1",), "namespaces"),
    Kind("Pod", ("v1",), "pods"),
    Kind("Service", ("v1",), "services"),
    Kind(endpoints.KIND, endpoints.API_VERSIONS, "endpointslices"),
    Kind("Node", ("v1",), "nodes"),
    Kind(
        "PeerAuthentication",
        _newest_first(PEER_AUTHENTICATION_API_VERSIONS),
        "peerauthentications",
        optional=True,
    ),
    Kind(authz.KIND, _newest_first(authz.API_VERSIONS), "authorizationpolicies", optional=True),
    Kind(
        virtualservice.KIND,
        _newest_first(virtualservice.API_VERSIONS),
        "virtualservices",
        optional=True,
    ),
    Kind(
        destinationrule.KIND,
        _newest_first(destinationrule.API_VERSIONS),
        "destinationrules",
        optional=True,
    ),
    Kind(waypoints.KIND, _newest_first(waypoints.API_VERSIONS), "gateways", optional=True),
    Kind(httproute.KIND, _newest_first(httproute.API_VERSIONS), "httproutes", optional=True),
    Kind(ratelimit.KIND, _newest_first(ratelimit.API_VERSIONS), "ratelimits", optional=True),
)


class KubernetesSource:
    """Watches ``kinds`` through ``api``; calls ``apply`` with all objects after changes."""

    def __init__(
        self,
        api: KubeApi,
        apply: Callable[[list[SourcedObject]], None],
        kinds: Iterable[Kind] = KINDS,
        debounce: float = DEBOUNCE,
        reflector: ReflectorFactory = Reflector,
    ) -> None:
        self._apply = apply
        self._debounce = debounce
        self._changed = asyncio.Event()
        self.applied = asyncio.Event()
        self.rejected = 0  # states of the cluster refused (a metric)
        self.reflectors = [reflector(api, kind, self._changed.set) for kind in kinds]

    def objects(self) -> list[SourcedObject]:
        """Every object of every kind, as translation takes them."""
        return [
            SourcedObject(obj, SOURCE)
            for reflector in self.reflectors
            for _, obj in sorted(reflector.objects.items())
        ]

    async def run(self) -> None:
        tasks = [asyncio.create_task(r.run(), name=str(r)) for r in self.reflectors]
        try:
            await asyncio.gather(*(r.synced.wait() for r in self.reflectors))
            log.info("listed every kind; translating")
            self._changed.set()
            while True:
                await self._changed.wait()
                await asyncio.sleep(self._debounce)
                self._changed.clear()
                self._translate()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _translate(self) -> None:
        try:
            self._apply(self.objects())
        except ConfigError as e:
            self.rejected += 1
            log.error("configuration rejected, keeping the last good one: %s", e)
            return
        except Exception:
            self.rejected += 1
            log.exception("configuration update failed (a bug), keeping the last good one")
            return
        self.applied.set()
