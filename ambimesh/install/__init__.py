"""``ambimesh install``: the Kubernetes manifests of an ambimesh install, from values.

Values come from the bundled ``values.yaml`` (also the Helm chart's), then ``-f FILE``s,
then ``--set path=value``s, as with ``helm template``. The objects themselves are built
in ``manifests.py``; ``chart.py`` writes the Helm chart and the checked-in plain manifests
from the same code (docs/install.md says why Python, not Helm, is the source).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ambimesh.install.manifests import Manifest, Obj, build

DEFAULT_NAMESPACE = "ambimesh-system"
# Mappings placed whole into an object (so a user's replaces the default instead of
# merging into it, and the chart renders them with toYaml). Lists are always whole.
WHOLE_VALUES = frozenset(
    {
        "controller.resources",
        "controller.nodeSelector",
        "node.agentResources",
        "node.ztunnelResources",
        "node.nodeSelector",
    }
)
HEADER = "# ambimesh: generated from ambimesh/install (make deploy); do not edit by hand.\n"


class ValuesError(ValueError):
    """A values file or --set that cannot be used; the message says which and why."""


def values_text() -> str:
    return resources.files("ambimesh.install").joinpath("values.yaml").read_text("utf-8")


def default_values() -> dict[str, Any]:
    loaded = yaml.safe_load(values_text())
    assert isinstance(loaded, dict)
    return loaded


def load_values(files: Iterable[Path] = (), sets: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults, overlaid by each file (maps merge, anything else replaces), then each --set."""
    values = default_values()
    for path in files:
        try:
            loaded = yaml.safe_load(path.read_text("utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ValuesError(f"{path}: {exc}") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise ValuesError(f"{path}: must be a mapping, like the chart's values.yaml")
        values = _merge(values, loaded, str(path))
    for assignment in sets:
        values = _merge(values, _parse_set(assignment), f"--set {assignment}")
    return values


def _parse_set(assignment: str) -> dict[str, Any]:
    path, sep, text = assignment.partition("=")
    keys = path.split(".")
    if not sep or not all(keys):
        raise ValuesError(f"--set {assignment}: expected path.to.key=value")
    try:
        value: Any = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as exc:
        raise ValuesError(f"--set {assignment}: {exc}") from None
    for key in reversed(keys):
        value = {key: value}
    assert isinstance(value, dict)
    return value


def _merge(
    base: Mapping[str, Any], override: Mapping[str, Any], where: str, prefix: str = ""
) -> dict[str, Any]:
    """A copy of ``base`` with ``override`` laid over it; unknown keys are refused (typos)."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in merged:
            raise ValuesError(f"{where}: unknown value {path!r} (known: {', '.join(merged)})")
        if isinstance(merged[key], dict) and path not in WHOLE_VALUES:
            if not isinstance(value, dict):
                raise ValuesError(f"{where}: {path!r} must be a mapping")
            merged[key] = _merge(merged[key], value, where, f"{path}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def enabled(values: Mapping[str, Any], path: str) -> bool:
    node: Any = values
    for key in path.split("."):
        node = node[key]
    return bool(node)


def manifests(values: Mapping[str, Any], namespace: str = DEFAULT_NAMESPACE) -> list[Manifest]:
    """What ``values`` installs: conditional objects whose value is off are left out."""
    return [m for m in build(values, namespace) if m.when is None or enabled(values, m.when)]


def render(values: Mapping[str, Any], namespace: str = DEFAULT_NAMESPACE) -> list[Obj]:
    return [m.obj for m in manifests(values, namespace)]


def dump(objects: Iterable[Obj]) -> str:
    """Multi-document YAML, ready for ``kubectl apply -f -``."""
    docs = [yaml.safe_dump(obj, sort_keys=False, width=2**31) for obj in objects]
    return HEADER + "---\n" + "---\n".join(docs)
