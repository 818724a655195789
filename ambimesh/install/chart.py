"""Write the Helm chart and the plain manifests from ``manifests.py`` (``make deploy``).

Helm is not packaged for Debian and no Helm binary ships in a registry this project uses,
so templates cannot be the source (nothing here could render them). Instead each template
is its object built with *placeholders* as values: every value the builder places comes
out as a marker (``__V__node.drainSeconds__``), which is then replaced by the Go template
expression that reads it (``{{ .Values.node.drainSeconds }}``, ``| quote`` for strings,
``toYaml ... | nindent`` for mappings and lists placed whole). The templates use only
those forms plus one ``if`` around a conditional object; tests/unit/helm_subset.py
evaluates exactly that subset and the tests compare its output with ``render()``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ambimesh.install import (
    DEFAULT_NAMESPACE,
    HEADER,
    WHOLE_VALUES,
    default_values,
    dump,
    render,
    values_text,
)
from ambimesh.install.manifests import Manifest, build

CHART_VERSION = "0.1.0"
_MARKER = re.compile(r"__([VBR])__([A-Za-z0-9_.]+?)__")
_RELEASE_NAMESPACE = "__R__Namespace__"


def placeholders(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` with every value the builder places replaced by its marker."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, list) or path in WHOLE_VALUES:
            out[key] = f"__B__{path}__"
        elif isinstance(value, dict):
            out[key] = placeholders(value, f"{path}.")
        else:
            out[key] = f"__V__{path}__"
    return out


def _lookup(values: Mapping[str, Any], path: str) -> Any:
    node: Any = values
    for key in path.split("."):
        node = node[key]
    return node


def _expression(kind: str, path: str, defaults: Mapping[str, Any], whole: bool) -> str:
    if kind == "R":
        return "{{ .Release.Namespace }}"
    quote = whole and isinstance(_lookup(defaults, path), str)
    return f"{{{{ .Values.{path}{' | quote' if quote else ''} }}}}"


def _scalar(text: str, defaults: Mapping[str, Any]) -> str:
    """A YAML scalar (as PyYAML wrote it) that holds markers, as template text."""
    value = yaml.safe_load(text) if text[:1] in "'\"" else text
    assert isinstance(value, str)
    whole = _MARKER.fullmatch(value)
    if whole:
        return _expression(whole[1], whole[2], defaults, whole=True)
    parts, at = [], 0
    for match in _MARKER.finditer(value):
        parts.append(value[at : match.start()].replace("\\", "\\\\").replace('"', '\\"'))
        parts.append(_expression(match[1], match[2], defaults, whole=False))
        at = match.end()
    parts.append(value[at:].replace("\\", "\\\\").replace('"', '\\"'))
    return '"' + "".join(parts) + '"'


def _line(line: str, defaults: Mapping[str, Any]) -> str:
    if "__" not in line or not _MARKER.search(line):
        return line
    lead = re.match(r"\s*(?:- )*", line)
    assert lead is not None
    head, rest = line[: lead.end()], line[lead.end() :]
    key, sep, value = rest.partition(": ")
    if not sep:
        key, value = "", rest
    block = re.fullmatch(r"__B__([A-Za-z0-9_.]+)__", value)
    if block:
        indent = len(head) + 2
        return f"{head}{key}:\n{{{{- toYaml .Values.{block[1]} | nindent {indent} }}}}"
    return f"{head}{key}{sep}{_scalar(value, defaults)}"


def template(manifest: Manifest, defaults: Mapping[str, Any]) -> str:
    """The Helm template of one object (built with placeholders)."""
    text = yaml.safe_dump(manifest.obj, sort_keys=False, width=2**31)
    body = "\n".join(_line(line, defaults) for line in text.splitlines()) + "\n"
    if manifest.when is not None:
        body = f"{{{{- if .Values.{manifest.when} }}}}\n{body}{{{{- end }}}}\n"
    return HEADER + body


def chart_yaml() -> str:
    meta = {
        "apiVersion": "v2",
        "name": "ambimesh",
        "description": "ambimesh: a sidecar-less (ambient) service mesh — controller, "
        "node agent and ztunnel",
        "type": "application",
        "version": CHART_VERSION,
        "appVersion": CHART_VERSION,
        # DaemonSet maxSurge (the ztunnel handover) is GA since 1.25.
        "kubeVersion": ">=1.25.0-0",
    }
    return HEADER + yaml.safe_dump(meta, sort_keys=False)


def chart_files() -> dict[str, str]:
    """Path (relative to the chart directory) -> content, for every generated chart file."""
    defaults = default_values()
    files = {"Chart.yaml": chart_yaml(), "values.yaml": values_text()}
    for manifest in build(placeholders(defaults), _RELEASE_NAMESPACE):
        if manifest.crd:
            # Helm installs crds/ as they are, before the templates, never templated.
            files[f"crds/{manifest.file}"] = HEADER + yaml.safe_dump(manifest.obj, sort_keys=False)
        elif manifest.chart:
            files[f"templates/{manifest.file}"] = template(manifest, defaults)
    return files


def plain_manifests() -> str:
    """deploy/manifests/ambimesh.yaml: the default values, namespace ambimesh-system."""
    return dump(render(default_values(), DEFAULT_NAMESPACE))


def generated(deploy_dir: Path) -> dict[Path, str]:
    files = {deploy_dir / "helm" / "ambimesh" / k: v for k, v in chart_files().items()}
    files[deploy_dir / "manifests" / "ambimesh.yaml"] = plain_manifests()
    return files


def write(deploy_dir: Path) -> list[Path]:
    """(Re)write the chart and the manifests; removes stale generated chart files."""
    files = generated(deploy_dir)
    for sub in ("templates", "crds"):
        shutil.rmtree(deploy_dir / "helm" / "ambimesh" / sub, ignore_errors=True)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, "utf-8")
    return sorted(files)
