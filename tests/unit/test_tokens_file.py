"""The join-tokens file is YAML too: odd entries are TokensFileErrors with bounded messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.auth import TokenAuthenticator, TokensFileError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node-a: " + "9" * 5000 + "\n", "not valid YAML: Exceeds the limit"),
        ("? " + "x" * 100_000 + "\n: 1\n", "entry 'xxxx"),
    ],
)
def test_bad_tokens_file_is_one_short_error(tmp_path: Path, text: str, expected: str) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(text)
    tokens.chmod(0o600)
    with pytest.raises(TokensFileError) as info:
        TokenAuthenticator(tokens)
    assert expected in str(info.value)
    assert len(str(info.value)) < 400
