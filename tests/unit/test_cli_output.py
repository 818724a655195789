"""The CLI's shared `--output table|json|yaml` (ambimesh/output.py), and validate using it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ambimesh import output
from ambimesh.cli import main


def test_columns_align_and_show_empty_as_dash() -> None:
    out = output.columns(
        ["NAME", "ADDRESSES", "OK"],
        [["a", ["10.0.0.1", "10.0.0.2"], True], ["long-name", [], None]],
    )
    assert out.splitlines() == [
        "NAME       ADDRESSES          OK",
        "a          10.0.0.1,10.0.0.2  yes",
        "long-name  -                  -",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (59, "59s"),
        (75, "1m15s"),
        (3600 * 5 + 120, "5h2m"),
        (86400 * 2 + 3 * 3600, "2d3h"),
        (-90, "-1m30s"),
    ],
)
def test_duration(seconds: float, text: str) -> None:
    assert output.duration(seconds) == text


def test_seconds_until_iso_time() -> None:
    assert output.seconds_until("1970-01-01T00:01:40+00:00", 40.0) == 60.0
    assert output.seconds_until("soon", 0.0) is None
    assert output.time_left("soon", 0.0) == "?"


def test_json_and_yaml_are_the_same_data_and_table_is_lazy() -> None:
    data = {"nodes": [{"name": "node-1", "ok": True, "n": 3, "none": None}]}
    called: list[int] = []

    def table() -> str:
        called.append(1)
        return "T"

    assert json.loads(output.render(data, "json", table)) == data
    assert yaml.safe_load(output.render(data, "yaml", table)) == data
    assert not called
    assert output.render(data, "table", table) == "T"


def test_validate_prints_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: x\n")
    with pytest.raises(SystemExit) as exited:
        main(["validate", "-f", str(bad), "--output", "yaml"])
    assert exited.value.code == 1
    findings = yaml.safe_load(capsys.readouterr().out)
    assert [f["level"] for f in findings] == ["error"]
    assert findings[0]["file"] == str(bad)
