"""Node components' controller credentials: clear errors, and the token never in a repr."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mesh.node_config import ControllerAccess, NodeConfigError, add_controller_flags


def parse(
    tmp_path: Path, token: str | None = "s3cret-token", root: bool = True
) -> ControllerAccess:
    if root:
        (tmp_path / "root.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    if token is not None:
        (tmp_path / "token").write_text(token + "\n")
    parser = argparse.ArgumentParser()
    add_controller_flags(parser)
    args = parser.parse_args(
        [
            "--node",
            "node-1",
            "--controller",
            "198.18.0.1:15012",
            "--root-cert",
            str(tmp_path / "root.pem"),
            "--token-file",
            str(tmp_path / "token"),
        ]
    )
    return ControllerAccess.from_args(args)


def test_reads_the_files_the_flags_name(tmp_path: Path) -> None:
    access = parse(tmp_path)
    assert (access.node, access.target, access.token) == (
        "node-1",
        "198.18.0.1:15012",
        "s3cret-token",
    )
    assert access.root_pem.startswith(b"-----BEGIN")
    assert "s3cret" not in repr(access)


@pytest.mark.parametrize(
    ("token", "root", "message"),
    [
        (None, True, "cannot read .*token"),
        ("", True, "token is empty"),
        ("t", False, "cannot read .*root.pem"),
    ],
)
def test_missing_or_empty_files_are_named(
    tmp_path: Path, token: str | None, root: bool, message: str
) -> None:
    with pytest.raises(NodeConfigError, match=message):
        parse(tmp_path, token, root)


def test_a_rotated_token_is_read_at_each_use_and_a_vanished_one_falls_back(
    tmp_path: Path,
) -> None:
    """The kubelet rotates projected service-account tokens (hourly by default): a node
    that kept the first one would stop authenticating."""
    access = parse(tmp_path, token="first")
    assert access.current_token() == "first"
    (tmp_path / "token").write_text("second\n")
    assert access.current_token() == "second"
    (tmp_path / "token").write_text("")  # caught mid-rotation
    assert access.current_token() == "first"
    (tmp_path / "token").unlink()
    assert access.current_token() == "first"
