"""``python -m bench``'s arguments: ``--only`` picks the tests, in the usual run order."""

from __future__ import annotations

import pytest

from bench.runner import TESTS, parse_args


def test_all_tests_by_default() -> None:
    assert parse_args([]).only == TESTS


def test_only_one_test() -> None:
    assert parse_args(["--only", "bulk"]).only == ("bulk",)


def test_only_several_in_run_order_without_duplicates() -> None:
    assert parse_args(["--only", "latency, rps,rps"]).only == ("rps", "latency")


@pytest.mark.parametrize("value", ["bulk,nope", "", ","])
def test_unknown_or_empty_test_is_an_error_naming_it(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--only", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--only" in err
    assert "choose from bulk, rps, close, latency" in err
    if value == "bulk,nope":
        assert "unknown test nope" in err
