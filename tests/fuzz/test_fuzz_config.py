"""Fuzz target: config translation (`controller.translate.translate`) and the YAML directory
source (`controller.sources.files.load_file`).

Feeds Kubernetes-like objects (Namespace, Pod, Service, PeerAuthentication,
AuthorizationPolicy) whose every field may be right or junk (wrong types, None, huge
strings, unicode, nested lists and mappings), and YAML text: dumped objects cut or spliced
with YAML punctuation, random YAML-ish text, invalid UTF-8, deep nesting, aliases.
Properties: translation returns resources or raises `ConfigError`, never anything else (the
controller would crash at startup, or keep a stale config while logging a "bug"); every
`ConfigError` names its source and stays short (user values are quoted with a cap), so a
hostile file cannot flood the log.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from controller.sources.files import load_file
from controller.translate import ConfigError, SourcedObject, translate
from mesh.api import mesh_pb2
from tests.fuzz.profiles import examples

# The longest message a rejected config may log: a source, an object, a field, a few
# quoted values of at most controller.quoting.LIMIT characters each.
MAX_MESSAGE = 2000
SOURCE = "fuzz/objects.yaml"

_huge = st.integers(1000, 20_000).map(lambda n: "x" * n)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=16),
    st.sampled_from(
        [
            "ambient",
            "none",
            "STRICT",
            "permissive",
            "ALLOW",
            "DENY",
            "CUSTOM",
            "10.0.0.1",
            "fd00::1",
            "10.0.0.0/8",
            "80",
            "http",
            "None",
            "",
            "demo",
            "default",
            "*",
        ]
    ),
    _huge,
)
_junk = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers(), st.none()), inner, max_size=3
        ),
    ),
    max_leaves=8,
)


def maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right shape (so that inputs get past the first check), sometimes junk."""
    return st.integers(0, 4).flatmap(lambda n: good if n else _junk)


def fields(
    required: dict[str, st.SearchStrategy[Any]] | None = None, **optional: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """A mapping with `required` and any subset of `optional`, each maybe junk, sometimes
    an extra key."""
    return st.fixed_dictionaries(
        {k: maybe(v) for k, v in (required or {}).items()},
        optional={k: maybe(v) for k, v in optional.items()} | {"extra": _junk},
    )


_names = st.one_of(
    st.sampled_from(["demo", "app", "server", "default", "istio-system"]),
    st.text(max_size=12),
    _huge,
)
_labels = st.dictionaries(
    st.sampled_from(
        [
            "app",
            "ambimesh.io/dataplane-mode",
            "istio.io/dataplane-mode",
            "ambimesh.io/use-waypoint",
            "pod-template-hash",
            "version",
        ]
    ),
    st.one_of(st.sampled_from(["ambient", "none", "demo", "waypoint"]), _scalars),
    max_size=3,
)
_ips = st.one_of(
    st.sampled_from(["10.0.0.1", "10.0.0.2", "fd00::1", "None", "", "300.1.1.1"]),
    st.text(max_size=8),
)
_ports = st.one_of(st.integers(-1, 70000), st.sampled_from(["80", "http", "08080", ""]))
_metadata = fields(
    {"name": _names},
    namespace=_names,
    labels=_labels,
    uid=st.text(max_size=12),
    ownerReferences=st.lists(
        fields(kind=st.sampled_from(["ReplicaSet", "Job"]), name=_names, controller=st.booleans()),
        max_size=2,
    ),
)
_selector = fields(matchLabels=_labels)
_pod = fields(
    {
        "spec": fields(
            {"nodeName": _names},
            serviceAccountName=_names,
            hostNetwork=st.booleans(),
            containers=st.lists(
                fields(ports=st.lists(fields(name=_names, containerPort=_ports), max_size=2)),
                max_size=2,
            ),
        ),
        "status": fields({"podIP": _ips}, podIPs=st.lists(fields(ip=_ips), max_size=2)),
    },
)
_service = fields(
    spec=fields(
        selector=_labels,
        clusterIP=_ips,
        clusterIPs=st.lists(_ips, max_size=2),
        ports=st.lists(fields(name=_names, port=_ports, targetPort=_ports), max_size=2),
    )
)
_modes = st.sampled_from(["STRICT", "PERMISSIVE", "DISABLE", "UNSET", "strict", "bogus"])
_peer_authentication = fields(
    spec=fields(
        selector=_selector,
        mtls=fields(mode=_modes),
        portLevelMtls=st.dictionaries(_ports, fields(mode=_modes), max_size=2),
    )
)
_strings = st.lists(st.one_of(_names, _ips, st.just("cluster.local/ns/demo/sa/app")), max_size=2)
_authorization_policy = fields(
    spec=fields(
        selector=_selector,
        action=st.sampled_from(["ALLOW", "DENY", "AUDIT", "CUSTOM", "allow"]),
        targetRefs=st.lists(fields(kind=_names, name=_names), max_size=1),
        rules=st.lists(
            fields(  # from/to/when present (each maybe empty or junk)
                {
                    "from": st.lists(
                        fields(
                            source=fields(
                                principals=_strings,
                                notPrincipals=_strings,
                                namespaces=_strings,
                                ipBlocks=_strings,
                                requestPrincipals=_strings,
                            )
                        ),
                        max_size=2,
                    ),
                    "to": st.lists(
                        fields(
                            operation=fields(ports=st.lists(_ports, max_size=2), methods=_strings)
                        ),
                        max_size=2,
                    ),
                    "when": st.lists(
                        fields(
                            key=st.sampled_from(
                                ["source.ip", "destination.port", "request.headers[x]", "bogus"]
                            ),
                            values=_strings,
                            notValues=_strings,
                        ),
                        max_size=2,
                    ),
                }
            ),
            max_size=2,
        ),
    )
)
_kinds = st.sampled_from(
    [
        ("v1", "Namespace", st.just({})),
        ("v1", "Pod", _pod),
        ("v1", "Service", _service),
        ("security.istio.io/v1", "PeerAuthentication", _peer_authentication),
        ("security.istio.io/v1beta1", "AuthorizationPolicy", _authorization_policy),
    ]
)


@st.composite
def _objects(draw: st.DrawFn) -> dict[Any, Any]:
    api_version, kind, body = draw(_kinds)
    obj: dict[Any, Any] = {"apiVersion": api_version, "kind": kind, "metadata": draw(_metadata)}
    obj.update(draw(body))
    if draw(st.integers(0, 9)) == 0:  # now and then a junk envelope
        obj[draw(st.sampled_from(["apiVersion", "kind", "metadata"]))] = draw(_junk)
    return obj


def check_error(error: ConfigError, source: str) -> None:
    message = str(error)
    assert source in message, f"the error names no source: {message[:300]!r}"
    assert len(message) <= MAX_MESSAGE, f"{len(message)} characters: {message[:300]!r}…"


def check_translate(objects: list[SourcedObject]) -> None:
    try:
        resources = translate(objects)
    except ConfigError as error:
        event("translate: rejected")
        check_error(error, SOURCE if not objects else objects[0].source.split("#")[0])
        return
    event(f"translate: {min(len(resources), 2)}{'+' if len(resources) >= 2 else ''} resources")
    assert all(isinstance(r, mesh_pb2.Resource) for r in resources.values())


@settings(max_examples=examples(1.5))
@given(st.lists(_objects(), max_size=5))
@example(
    [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {"nodeName": "n"},
            "status": {"podIP": "x" * 5000},
        }
    ]
)
def test_translate_accepts_or_rejects_with_a_short_error(objects: list[dict[Any, Any]]) -> None:
    check_translate([SourcedObject(obj, f"{SOURCE}#{i + 1}") for i, obj in enumerate(objects)])


def _yaml_of(objects: list[dict[Any, Any]]) -> str:
    try:
        return yaml.safe_dump_all(objects, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return ""


_punctuation = st.sampled_from(list("-:{}[]&*!|>'\"#%@`,?~\n\t "))
_tokens = st.one_of(_punctuation, st.sampled_from(["---\n", "...\n", "<<: ", "!!python/object "]))


@st.composite
def _yaml_texts(draw: st.DrawFn) -> str:
    shape = draw(st.sampled_from(["dump", "cut", "spliced", "random", "nested"]))
    if shape == "random":
        return draw(st.text(alphabet=st.one_of(_punctuation, st.characters()), max_size=200))
    if shape == "nested":
        depth = draw(st.integers(1, 3000))
        return "a: " + "[" * depth + "]" * depth
    text = _yaml_of(draw(st.lists(_objects(), min_size=1, max_size=3)))
    if shape == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif shape == "spliced":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(_tokens) + text[at:]
    return text


@settings(max_examples=examples(0.5))
@given(_yaml_texts(), st.booleans())
@example("a: &a [*a, *a]\n", False)  # an alias that refers to itself
@example(
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ),
    False,
)  # a billion laughs
@example(
    f"kind: Pod\napiVersion: v1\nmetadata: {{name: p}}\nstatus: {{podIP: 1{'0' * 5000}}}\n", False
)
def test_yaml_files_load_or_fail_with_a_short_error(text: str, invalid_utf8: bool) -> None:
    data = text.encode("utf-8", "surrogatepass") + (b"\xff\xfe" if invalid_utf8 else b"")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "objects.yaml"
        path.write_bytes(data)
        try:
            objects = load_file(path)
        except ConfigError as error:
            event("load: rejected")
            check_error(error, str(path))
            return
        check_translate(objects)
