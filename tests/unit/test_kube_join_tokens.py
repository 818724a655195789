"""``ambimesh token create NODE``: a join token the controller accepts at once, printed
once, in a file nobody else can read; existing tokens kept, a malformed file left alone."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from ambimesh.cli import main
from controller.auth import AuthError, Caller, TokenAuthenticator


def create(tokens: Path, *extra: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main(["token", "create", *extra, "--tokens", str(tokens)])
    return int(exited.value.code or 0)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_a_created_token_is_accepted_by_the_running_controller(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "etc" / "tokens.yaml"
    assert create(tokens, "vm-1") == 0
    first = capsys.readouterr()
    token = first.out.strip()
    assert first.out == f"{token}\n" and len(token) >= 40  # stdout holds the token alone
    assert "not shown again" in first.err and token not in first.err
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o600
    assert stat.S_IMODE(tokens.parent.stat().st_mode) == 0o700
    controller = TokenAuthenticator(tokens)
    assert await controller.authenticate(bearer(token)) == Caller("vm-1")

    # A second node: the first keeps its token; the controller re-reads the file.
    assert create(tokens, "vm-2") == 0
    second = capsys.readouterr().out.strip()
    assert second != token
    assert await controller.authenticate(bearer(second)) == Caller("vm-2")
    assert await controller.authenticate(bearer(token)) == Caller("vm-1")

    # No silent replacement; --rotate replaces, and the old token stops working.
    assert create(tokens, "vm-1") == 1
    assert "--rotate" in capsys.readouterr().err
    assert create(tokens, "vm-1", "--rotate") == 0
    rotated = capsys.readouterr().out.strip()
    assert await controller.authenticate(bearer(rotated)) == Caller("vm-1")
    with pytest.raises(AuthError):
        await controller.authenticate(bearer(token))
    assert sorted(yaml.safe_load(tokens.read_text())) == ["vm-1", "vm-2"]
    assert [p.name for p in tokens.parent.iterdir() if p.name.endswith(".new")] == []


@pytest.mark.parametrize(
    ("content", "node", "problem"),
    [
        ("vm-1: [not, a, token]\n", "vm-2", "must be non-empty strings; fix it first"),
        ("", "VM_1", "is not a node name"),
    ],
)
def test_refusals_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, node: str, problem: str
) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(content)
    assert create(tokens, node) == 1
    assert problem in capsys.readouterr().err
    assert tokens.read_text() == content
