"""The translation memo never changes a result: after each of many random edits, a pass
that reuses the previous passes' work (pods, Services, label indexes, contexts) gives the
same resources, or the same error, as a pass from scratch.

The edits are what a relabel or a rollout does to a mesh: namespace and pod labels, pod
IPs (some clash, so the conflict check's errors are compared too), nodes, named container
ports, Service selectors, addresses and target ports, waypoints appearing and going, pods
and Services added and removed. Every edit replaces the object with a new mapping, as the
sources do.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from controller.translate import ConfigError, Memo, SourcedObject, translate
from mesh.api import mesh_pb2
from tests.unit.l7_objects import gateway

NAMESPACES = ("a", "b", "c")
GW_LABEL = "gateway.networking.k8s.io/gateway-name"
Objects = dict[str, tuple[str, dict[str, Any]]]  # key -> (source, object)


def namespace(name: str) -> dict[str, Any]:
    labels = {"ambimesh.io/dataplane-mode": "ambient"}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(name: str, ns: str, n: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": f"app{n % 3}"}},
        "spec": {
            "nodeName": f"node-{n % 4}",
            "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"podIP": f"10.1.{n // 200}.{n % 200 + 1}"},
    }


def service(name: str, ns: str, n: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"app": f"app{n % 3}"},
            "ports": [{"port": 80, "targetPort": "http"}],
            "clusterIP": f"10.96.0.{n + 1}",
        },
    }


def initial() -> Objects:
    objects: Objects = {}
    for i, ns in enumerate(NAMESPACES):
        objects[f"ns/{ns}"] = (f"{ns}.yaml#1", namespace(ns))
        for n in range(8):
            number = i * 8 + n
            objects[f"pod/{ns}/p{n}"] = (f"{ns}.yaml#{n + 2}", pod(f"p{n}", ns, number))
        for n in range(3):
            number = i * 3 + n
            objects[f"svc/{ns}/s{n}"] = (f"{ns}.yaml#{n + 20}", service(f"s{n}", ns, number))
    return objects


def edit(objects: Objects, rng: random.Random, step: int) -> None:
    """One random change: a new mapping for one object, or one added or removed."""
    ns = rng.choice(NAMESPACES)
    choice = rng.randrange(12)
    if choice == 0:  # add or remove a pod
        key = f"pod/{ns}/extra{rng.randrange(3)}"
        if key in objects:
            del objects[key]
        else:
            objects[key] = (f"extra.yaml#{step}", pod(key.rsplit("/", 1)[1], ns, rng.randrange(40)))
        return
    if choice == 1:  # a waypoint appears or goes
        key = f"gw/{ns}"
        if key in objects:
            del objects[key]
        else:
            objects[key] = (f"{ns}-gw.yaml#1", gateway("waypoint", ns, rng.choice([None, "all"])))
        return
    if choice == 2:  # add or remove a Service
        key = f"svc/{ns}/extra"
        if key in objects:
            del objects[key]
        else:
            objects[key] = (f"extra-svc.yaml#{step}", service("extra", ns, rng.randrange(12)))
        return
    kind = "ns" if choice in (3, 4) else "svc" if choice in (5, 6) else "pod"
    candidates = [k for k in objects if k.startswith(f"{kind}/{ns}")]
    key = rng.choice(candidates)
    source, old = objects[key]
    obj = copy.deepcopy(old)
    labels = obj["metadata"].setdefault("labels", {})
    if kind == "ns":
        if choice == 3:
            labels["ambimesh.io/dataplane-mode"] = rng.choice(["ambient", "none"])
        else:
            _toggle(labels, "istio.io/use-waypoint", "waypoint", rng)
    elif kind == "svc":
        spec = obj["spec"]
        what = rng.randrange(4)
        if what == 0:
            spec["selector"] = {"app": f"app{rng.randrange(4)}"}
        elif what == 1:
            spec["clusterIP"] = f"10.96.0.{rng.randrange(12) + 1}"
        elif what == 2:
            spec["ports"][0]["targetPort"] = rng.choice(["http", 8080, "grpc"])
        else:
            _toggle(labels, "istio.io/use-waypoint", "waypoint", rng)
    else:
        what = rng.randrange(6)
        if what == 0:
            labels["app"] = f"app{rng.randrange(4)}"
        elif what == 1:
            obj["status"] = {"podIP": f"10.1.0.{rng.randrange(30) + 1}"}
        elif what == 2:
            obj["spec"]["nodeName"] = rng.choice(["", "node-0", "node-1"])
        elif what == 3:
            port = obj["spec"]["containers"][0]["ports"][0]
            port["containerPort"] = rng.choice([8080, 9090])
        elif what == 4:
            _toggle(labels, GW_LABEL, "waypoint", rng)
        else:
            _toggle(labels, "ambimesh.io/dataplane-mode", rng.choice(["ambient", "none"]), rng)
    objects[key] = (source, obj)


def _toggle(labels: dict[str, str], name: str, value: str, rng: random.Random) -> None:
    if name in labels and rng.random() < 0.5:
        del labels[name]
    else:
        labels[name] = value


def outcome(
    objects: Objects, in_force: dict[str, mesh_pb2.Resource], memo: Memo | None
) -> dict[str, mesh_pb2.Resource] | str:
    sourced = [SourcedObject(obj, source) for source, obj in objects.values()]
    try:
        return translate(sourced, in_force=in_force, memo=memo)
    except ConfigError as e:
        return f"error: {e}"


@pytest.mark.parametrize("seed", range(6))
def test_incremental_passes_equal_full_passes_after_random_edits(seed: int) -> None:
    rng = random.Random(seed)
    objects = initial()
    memo = Memo()
    in_force: dict[str, mesh_pb2.Resource] = {}
    errors = 0
    for step in range(150):
        before = dict(objects)
        if step:
            edit(objects, rng, step)
        incremental = outcome(objects, in_force, memo)
        full = outcome(objects, in_force, None)
        assert incremental == full, f"seed {seed}, step {step}"
        if isinstance(full, str):
            errors += 1
            if rng.random() < 0.5:  # someone fixes the mistake; else edits go on from it
                objects = before
        else:
            in_force = full
    assert errors, "the edits never made a conflict: the error path went untested"
