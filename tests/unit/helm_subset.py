"""Renders the Go-template subset the generated chart uses, as Helm would.

No Helm here (docs/install.md), so the chart is checked by evaluating exactly the forms
``ambimesh/install/chart.py`` emits, with Helm's and Sprig's meaning:

- ``{{ .Values.a.b }}`` / ``{{ .Release.Namespace }}``: the value printed as Go's text/template
  prints it (``true``/``false``, integers in decimal, strings as they are);
- ``{{ .Values.a.b | quote }}``: Sprig's ``quote`` (a double-quoted string);
- ``{{- toYaml .Values.a.b | nindent N }}``: trims the whitespace before it, then a newline
  and the value as YAML indented by N spaces;
- ``{{- if .Values.a.b }}`` ... ``{{- end }}`` around a whole file (Go's truthiness).

Any other action is an error, so the generator cannot start using a construct this check
does not understand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import yaml

_ACTION = re.compile(r"(\s*)\{\{(-?) (.*?) \}\}")
_PATH = r"\.(Values(?:\.[A-Za-z0-9_]+)+|Release\.Namespace)"


class UnsupportedTemplate(ValueError):
    pass


def _value(path: str, values: Mapping[str, Any], namespace: str) -> Any:
    if path == "Release.Namespace":
        return namespace
    node: Any = values
    for key in path.split(".")[1:]:
        node = node[key]
    return node


def _print(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise UnsupportedTemplate(f"printing {value!r} without toYaml")


def _action(body: str, values: Mapping[str, Any], namespace: str) -> tuple[str, bool]:
    """(text, trims the whitespace before it) of one action."""
    if m := re.fullmatch(_PATH, body):
        return _print(_value(m[1], values, namespace)), False
    if m := re.fullmatch(_PATH + r" \| quote", body):
        return json.dumps(_print(_value(m[1], values, namespace))), False
    if m := re.fullmatch(r"toYaml " + _PATH + r" \| nindent (\d+)", body):
        text = yaml.safe_dump(_value(m[1], values, namespace), default_flow_style=False)
        pad = " " * int(m[2])
        return "\n" + "\n".join(pad + line for line in text.rstrip("\n").splitlines()), True
    raise UnsupportedTemplate(body)


def render(template: str, values: Mapping[str, Any], namespace: str) -> str:
    """One template file's output (empty when its ``if`` is false)."""
    if m := re.search(r"\{\{- if " + _PATH + r" \}\}\n(.*)\{\{- end \}\}\n\Z", template, re.S):
        if not _value(m[1], values, namespace):
            return ""
        template = template[: m.start()] + m[2]
    out, at = [], 0
    for m in _ACTION.finditer(template):
        text, trims = _action(m[3], values, namespace)
        if m[2] == "-" and not trims:
            raise UnsupportedTemplate(m[0])
        out.append(template[at : m.start()])
        out.append(("" if m[2] == "-" else m[1]) + text)
        at = m.end()
    out.append(template[at:])
    return "".join(out)
