"""mesh.spiffe: parse/format round trip and the forms that are not mesh SPIFFE IDs."""

from __future__ import annotations

import dataclasses

import pytest

from mesh.spiffe import SpiffeError, SpiffeId


@pytest.mark.parametrize(
    ("uri", "trust_domain", "namespace", "service_account"),
    [
        ("spiffe://cluster.local/ns/demo/sa/server", "cluster.local", "demo", "server"),
        ("spiffe://cluster.local/ns/default/sa/default", "cluster.local", "default", "default"),
        ("spiffe://example.org/ns/kube-system/sa/coredns", "example.org", "kube-system", "coredns"),
        ("spiffe://td/ns/a/sa/b", "td", "a", "b"),
        (
            "spiffe://my_td-1.example/ns/ns-2/sa/sa.with.dots",
            "my_td-1.example",
            "ns-2",
            "sa.with.dots",
        ),
        ("spiffe://0td9/ns/0/sa/9z", "0td9", "0", "9z"),
    ],
)
def test_parse_and_format_round_trip(
    uri: str, trust_domain: str, namespace: str, service_account: str
) -> None:
    sid = SpiffeId.parse(uri)
    assert sid == SpiffeId(trust_domain, namespace, service_account)
    assert (sid.trust_domain, sid.namespace, sid.service_account) == (
        trust_domain,
        namespace,
        service_account,
    )
    assert sid.uri == uri
    assert str(sid) == uri
    assert SpiffeId.parse(sid.uri) == sid


def test_uri_layout() -> None:
    sid = SpiffeId("cluster.local", "demo", "client")
    assert sid.uri == "spiffe://cluster.local/ns/demo/sa/client"


def test_identity_is_a_hashable_frozen_value() -> None:
    a = SpiffeId("cluster.local", "demo", "client")
    b = SpiffeId.parse("spiffe://cluster.local/ns/demo/sa/client")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != SpiffeId("cluster.local", "demo", "server")
    assert a != SpiffeId("cluster.local", "other", "client")
    assert a != SpiffeId("example.org", "demo", "client")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.namespace = "other"  # type: ignore[misc]


def test_identities_are_ordered_by_trust_domain_then_namespace_then_account() -> None:
    ids = [
        SpiffeId("b.td", "a", "a"),
        SpiffeId("a.td", "b", "a"),
        SpiffeId("a.td", "a", "b"),
        SpiffeId("a.td", "a", "a"),
    ]
    assert sorted(ids) == list(reversed(ids))


@pytest.mark.parametrize(
    "uri",
    [
        # wrong or missing scheme
        "http://cluster.local/ns/demo/sa/server",
        "spiffe:/cluster.local/ns/demo/sa/server",
        "spiffe:cluster.local/ns/demo/sa/server",
        "cluster.local/ns/demo/sa/server",
        "SPIFFE://cluster.local/ns/demo/sa/server",
        " spiffe://cluster.local/ns/demo/sa/server",
        "",
        # missing parts
        "spiffe://",
        "spiffe://cluster.local",
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns/demo",
        "spiffe://cluster.local/ns/demo/sa",
        "spiffe://cluster.local/ns/demo/sa/",
        "spiffe://cluster.local/ns//sa/server",
        "spiffe:///ns/demo/sa/server",
        # wrong keywords / order
        "spiffe://cluster.local/namespace/demo/sa/server",
        "spiffe://cluster.local/ns/demo/serviceaccount/server",
        "spiffe://cluster.local/sa/server/ns/demo",
        # extra path segments
        "spiffe://cluster.local/ns/demo/sa/server/extra",
        "spiffe://cluster.local/ns/demo/sa/server/",
        "spiffe://cluster.local//ns/demo/sa/server",
        "spiffe://cluster.local/x/ns/demo/sa/server",
        # uppercase
        "spiffe://Cluster.local/ns/demo/sa/server",
        "spiffe://cluster.local/ns/Demo/sa/server",
        "spiffe://cluster.local/ns/demo/sa/Server",
        "spiffe://cluster.local/NS/demo/sa/server",
        "spiffe://cluster.local/ns/demo/SA/server",
        # bad labels / trust domains
        "spiffe://cluster.local/ns/-demo/sa/server",
        "spiffe://cluster.local/ns/demo-/sa/server",
        "spiffe://cluster.local/ns/de_mo/sa/server",
        "spiffe://cluster.local/ns/demo/sa/ser ver",
        "spiffe://cluster.local/ns/demo/sa/server?x=1",
        "spiffe://cluster.local/ns/demo/sa/server#frag",
        "spiffe://cluster.local/ns/demo/sa/.server",
        "spiffe://-cluster.local/ns/demo/sa/server",
        "spiffe://cluster.local-/ns/demo/sa/server",
        "spiffe://cluster.local:8443/ns/demo/sa/server",
        "spiffe://user@cluster.local/ns/demo/sa/server",
    ],
)
def test_parse_rejects(uri: str) -> None:
    with pytest.raises(SpiffeError):
        SpiffeId.parse(uri)


def test_spiffe_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not a SPIFFE ID"):
        SpiffeId.parse("http://cluster.local/ns/demo/sa/server")
    with pytest.raises(ValueError, match="spiffe://<td>/ns/<namespace>/sa/<sa>"):
        SpiffeId.parse("spiffe://cluster.local/ns/demo")


@pytest.mark.parametrize(
    ("trust_domain", "namespace", "service_account", "message"),
    [
        ("", "demo", "server", "trust domain"),
        ("Cluster.local", "demo", "server", "trust domain"),
        ("cluster/local", "demo", "server", "trust domain"),
        ("cluster.local", "", "server", "namespace"),
        ("cluster.local", "Demo", "server", "namespace"),
        ("cluster.local", "demo/x", "server", "namespace"),
        ("cluster.local", "demo", "", "service account"),
        ("cluster.local", "demo", "a/b", "service account"),
        ("cluster.local", "demo", "-a", "service account"),
    ],
)
def test_constructor_validates(
    trust_domain: str, namespace: str, service_account: str, message: str
) -> None:
    with pytest.raises(SpiffeError, match=message):
        SpiffeId(trust_domain, namespace, service_account)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://cluster.local/ns/demo/sa/server\n",
        "spiffe://cluster.local\n/ns/demo/sa/server",
        "spiffe://cluster.local/ns/demo\n/sa/server",
    ],
)
def test_parse_rejects_trailing_newline_in_a_part(uri: str) -> None:
    with pytest.raises(SpiffeError):
        SpiffeId.parse(uri)


@pytest.mark.parametrize(
    "parts",
    [
        ("cluster.local\n", "demo", "server"),
        ("cluster.local", "demo\n", "server"),
        ("cluster.local", "demo", "server\n"),
    ],
)
def test_constructor_rejects_trailing_newline(parts: tuple[str, str, str]) -> None:
    with pytest.raises(SpiffeError):
        SpiffeId(*parts)
