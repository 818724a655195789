"""bench/envoy.py renders the HBONE pair the way ztunnel speaks it; the real Envoy (the
``bench`` extra) accepts both configs with certificates from the mesh CA; the load
generators' and nginx's configuration."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench import certs, envoy
from bench.envoy import TlsFiles
from bench.loadgen import WRK_SCRIPT, iperf3_argv, wrk_argv
from bench.testbed import nginx_conf
from mesh.spiffe import SpiffeId

CLIENT_ID = "spiffe://cluster.local/ns/legacy/sa/default"
SERVER_ID = "spiffe://cluster.local/ns/legacy/sa/server"


def tls(tmp: Path, name: str) -> TlsFiles:
    return TlsFiles(tmp / f"{name}.pem", tmp / f"{name}.key", tmp / "root-cert.pem")


def client(tmp: Path) -> dict[str, Any]:
    tunnels = {15001: "198.19.2.11:5201", 15002: "198.19.2.11:8081"}
    return envoy.client_config(tunnels, "198.19.2.11", tls(tmp, "client"), SERVER_ID)


def server(tmp: Path) -> dict[str, Any]:
    backends = [("198.19.2.11", 5201), ("198.19.2.11", 8081)]
    return envoy.server_config("198.19.2.11", backends, tls(tmp, "server"), CLIENT_ID)


def test_client_tunnels_each_port_to_its_authority_over_mtls13_h2(tmp_path: Path) -> None:
    cfg = client(tmp_path)["static_resources"]
    proxies = [lst["filter_chains"][0]["filters"][0]["typed_config"] for lst in cfg["listeners"]]
    assert [p["tunneling_config"]["hostname"] for p in proxies] == [
        "198.19.2.11:5201",
        "198.19.2.11:8081",
    ]
    (hbone,) = cfg["clusters"]
    endpoint = hbone["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "198.19.2.11", "port_value": 15008}
    context = hbone["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"] == ["h2"]
    assert set(context["tls_params"].values()) == {"TLSv1_3"}
    assert context["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": SERVER_ID
    }


def test_server_requires_the_client_identity_and_routes_by_authority(tmp_path: Path) -> None:
    (listener,) = server(tmp_path)["static_resources"]["listeners"]
    chain = listener["filter_chains"][0]
    tls_config = chain["transport_socket"]["typed_config"]
    assert tls_config["require_client_certificate"] is True
    san = tls_config["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert san[0]["matcher"] == {"exact": CLIENT_ID}
    hosts = chain["filters"][0]["typed_config"]["route_config"]["virtual_hosts"]
    assert [(h["domains"], h["routes"][0]["route"]["cluster"]) for h in hosts] == [
        (["198.19.2.11:5201"], "backend_5201"),
        (["198.19.2.11:8081"], "backend_8081"),
    ]


def test_real_envoy_accepts_both_configs(tmp_path: Path) -> None:
    try:
        binary = envoy.envoy_binary()
    except FileNotFoundError:
        pytest.skip("Envoy is not installed (the bench extra)")
    # leaves from a fresh mesh CA, as the bench issues them from the lab's
    for name, identity in (("client", CLIENT_ID), ("server", SERVER_ID)):
        issued = certs.issue(tmp_path / "ca", SpiffeId.parse(identity), tmp_path, name)
        assert issued == tls(tmp_path, name)
    for name, cfg in (("client", client(tmp_path)), ("server", server(tmp_path))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        done = subprocess.run(
            [str(binary), "--mode", "validate", "-c", str(path), "-l", "critical"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_load_generator_command_lines() -> None:
    assert iperf3_argv("198.19.2.10", 5201, 3) == [
        "iperf3", "-c", "198.19.2.10", "-p", "5201", "-t", "3", "-J",
    ]  # fmt: skip
    url = "http://198.19.2.10:8081/"
    base = ["wrk", "-c", "16", "-t", "2", "-d", "3s", "-s", str(WRK_SCRIPT)]
    assert wrk_argv(url, 3, 16, 2) == [*base, url]
    assert wrk_argv(url, 3, 16, 2, close=True) == [*base, "-H", "Connection: close", url]
    assert wrk_argv(url, 3, 16, 2, rate=1000) == [*base, url, "--", "1000", "2"]
    assert WRK_SCRIPT.is_file()


def test_nginx_answers_a_body_of_the_given_size(tmp_path: Path) -> None:
    conf = nginx_conf(tmp_path, 8081, 1024)
    body = conf.split('return 200 "')[1].split('"')[0]
    assert len(body.replace("\\n", "\n")) == 1024
    assert "listen 8081 " in conf and "worker_processes 1;" in conf
