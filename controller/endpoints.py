"""A Service's endpoints from its EndpointSlices (``discovery.k8s.io/v1``), with no I/O.

On a cluster the endpoints controller already did the work of a selector: it knows which
pods are ready, which are terminating, and it serves Services that have no selector at
all (endpoints managed by hand or by another controller). So when a Service has slices,
they decide its endpoints; the selector only stands in where nobody wrote slices (the
YAML directory, usually). Both sources hand slices to translation the same way.

A mesh endpoint is a workload (a pod), so an endpoint counts when it names a pod we know
(``targetRef`` kind Pod, by namespace and name; its ``uid``, when given, must be that
pod's: a stale slice may still name a pod that was deleted and created again) and is not
known to be unready (``conditions.ready`` false; Kubernetes reads a missing value as
ready). Endpoints that are not pods (external addresses) have no mesh identity and are
left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from controller.fields import ConfigObject, View

log = logging.getLogger(__name__)

KIND = "EndpointSlice"
API_VERSIONS = ("discovery.k8s.io/v1",)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

ServiceKey = tuple[str, str]
PodKey = tuple[str, str]


def by_service(slices: Iterable[ConfigObject]) -> dict[ServiceKey, list[ConfigObject]]:
    """The slices of each Service ``(namespace, name)``, from their service-name label;
    a slice without the label belongs to no Service (as in Kubernetes) and is ignored."""
    out: dict[ServiceKey, list[ConfigObject]] = {}
    for s in slices:
        service = s.labels("metadata.labels").get(SERVICE_NAME_LABEL, "")
        if service:
            out.setdefault((s.namespace, service), []).append(s)
        else:
            log.debug("%s: no %s label; belongs to no Service", s.describe(), SERVICE_NAME_LABEL)
    return out


def endpoint_pods(slices: Iterable[ConfigObject], pod_uids: Mapping[PodKey, str]) -> list[PodKey]:
    """The pods (namespace, name) the slices list as endpoints that may take traffic, each
    once, in slice order. ``pod_uids`` maps every known pod to its uid."""
    out: list[PodKey] = []
    for s in slices:
        for index, raw in enumerate(s.get("endpoints", list, [])):
            if not isinstance(raw, Mapping):
                raise s.error(f"endpoints[{index}]", "must be a mapping")
            pod = _pod(View(s, f"endpoints[{index}]", raw), s.namespace, pod_uids)
            if pod is not None and pod not in out:
                out.append(pod)
    return out


def _pod(endpoint: View, namespace: str, pod_uids: Mapping[PodKey, str]) -> PodKey | None:
    conditions = endpoint.view("conditions")
    if conditions is not None and conditions.has("ready") and not conditions.boolean("ready"):
        return None
    target = endpoint.view("targetRef")
    if target is None or target.string("kind") != "Pod":
        return None
    key = (target.string("namespace", namespace), target.string("name", required=True))
    uid = target.string("uid")
    known = pod_uids.get(key)
    if known is None or (uid and uid != known):
        log.debug("%s: endpoint names pod %s/%s, not known (yet)", endpoint.obj.describe(), *key)
        return None
    return key
