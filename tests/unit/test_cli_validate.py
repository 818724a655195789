"""`ambimesh validate` through the real CLI entry point, on files in temporary directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ambimesh.cli import main

LAB_CONFIG = Path(__file__).resolve().parents[2] / "ambimesh" / "lab" / "config"

BROKEN_VIRTUAL_SERVICE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: demo}
spec:
  hosts: [server]
  http:
    - timeout: soon
      route: [{destination: {host: server}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ghost, namespace: demo}
spec:
  hosts: [nothere]
  http:
    - route: [{destination: {host: server}}]
"""

SYNTAX_ERROR = "apiVersion: v1\nkind: Service\nmetadata: {name: x\n  namespace: [\n"

TWO_SERVICES_ONE_VIP = """\
apiVersion: v1
kind: Service
metadata: {name: first, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: second, namespace: demo}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
"""


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(["validate", *argv])
    code = exited.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().out


def broken_config(tmp_path: Path) -> Path:
    config = tmp_path / "config"
    shutil.copytree(LAB_CONFIG, config)
    (config / "routes.yaml").write_text(BROKEN_VIRTUAL_SERVICE)
    (config / "syntax.yaml").write_text(SYNTAX_ERROR)
    return config


def test_bundled_lab_config_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config"
    shutil.copytree(LAB_CONFIG, config)
    code, out = run(["-f", str(config)], capsys)
    assert code == 0
    assert "ERROR" not in out


def test_every_file_error_is_reported_with_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = broken_config(tmp_path)
    code, out = run(["-f", str(config)], capsys)
    assert code == 1
    lines = out.splitlines()
    assert any(
        line.startswith(f"ERROR   {config}/routes.yaml#1: VirtualService demo/broken: ")
        and "spec.http[0].timeout: 'soon' is not a duration" in line
        for line in lines
    ), out
    assert any(
        line.startswith(f"ERROR   {config}/syntax.yaml:4: YAML syntax error") for line in lines
    ), out
    assert any(
        line.startswith(f"WARNING {config}/routes.yaml#2: VirtualService demo/ghost: spec.hosts[0]")
        for line in lines
    ), out


def test_json_output_is_a_list_of_findings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = broken_config(tmp_path)
    code, out = run(["-f", str(config), "--output", "json"], capsys)
    assert code == 1
    findings = json.loads(out)
    by_location = {(f["level"], f["location"]): f for f in findings}
    vs = by_location[("error", f"{config}/routes.yaml#1")]
    assert vs["file"] == f"{config}/routes.yaml"
    assert vs["message"].startswith("VirtualService demo/broken: spec.http[0].timeout: ")
    assert ("error", f"{config}/syntax.yaml:4") in by_location
    assert ("warning", f"{config}/routes.yaml#2") in by_location
    assert sum(f["level"] == "error" for f in findings) == 2


def test_cross_object_errors_and_several_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vips = tmp_path / "vips.yaml"
    vips.write_text(TWO_SERVICES_ONE_VIP)
    routes = tmp_path / "routes.yml"
    routes.write_text(BROKEN_VIRTUAL_SERVICE)
    missing = tmp_path / "missing"
    argv = ["-f", str(vips), "-f", str(routes), "-f", str(vips), "-f", str(missing), "-o", "json"]
    code, out = run(argv, capsys)
    assert code == 1
    errors = {f["location"]: f["message"] for f in json.loads(out) if f["level"] == "error"}
    assert errors == {
        str(missing): "no such file or directory",
        f"{vips}#2": "Service demo/second: spec.clusterIP: 10.96.0.10 is also claimed by "
        f"Service demo/first ({vips}#1); an address can belong to one Service or pod only",
        f"{routes}#1": errors[f"{routes}#1"],
    }
    assert "spec.http[0].timeout" in errors[f"{routes}#1"]
