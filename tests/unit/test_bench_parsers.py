"""bench/parsers.py on outputs recorded from the real tools in the ambench lab
(tests/unit/data/bench/: iperf3 3.12, wrk 4.1 with bench/lua/wrk_bench.lua, py-spy 0.4
--native --format raw on a ztunnel, /proc of Linux 6.18)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.parsers import (
    ToolOutputError,
    listening_ports,
    loop_profile,
    parse_cgroup_usage_usec,
    parse_host_cpu,
    parse_iperf3,
    parse_pid_stat_ticks,
    parse_status_kib,
    parse_wrk,
)

DATA = Path(__file__).parent / "data" / "bench"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def test_iperf3_reports_the_receivers_total() -> None:
    result = parse_iperf3(recorded("iperf3.json"))
    assert result.bytes == 158846976
    assert result.bits_per_second == pytest.approx(614229242.18)
    assert result.seconds == pytest.approx(2.068895)


def test_iperf3_error_is_raised_with_its_message() -> None:
    with pytest.raises(ToolOutputError, match="Connection refused"):
        parse_iperf3(recorded("iperf3_refused.json"))


def test_iperf3_without_json_quotes_what_it_printed() -> None:
    with pytest.raises(ToolOutputError, match="no JSON: 'iperf3: error"):
        parse_iperf3("iperf3: error - unable to connect")


@pytest.mark.parametrize(
    ("name", "requests", "p50", "p99"),
    [
        ("wrk_keepalive.txt", 3800, 7866, 48680),
        ("wrk_paced.txt", 978, 4757, 78924),
        ("wrk_close.txt", 250, 115060, 257072),
    ],
)
def test_wrk_summary_line(name: str, requests: int, p50: int, p99: int) -> None:
    result = parse_wrk(recorded(name))
    assert (result.requests, result.p50_us, result.p99_us) == (requests, p50, p99)
    assert result.errors == 0


def test_wrk_rate_is_requests_over_its_own_duration() -> None:
    result = parse_wrk(recorded("wrk_keepalive.txt"))
    assert result.seconds == pytest.approx(2.00887)
    assert result.rps == pytest.approx(3800 / 2.00887)


def test_wrk_errors_are_summed() -> None:
    line = (
        'JSON {"requests":10,"duration_us":1000000,"bytes":1,"p50_us":1,"p90_us":2,"p99_us":3,'
        '"max_us":4,"err_connect":1,"err_read":2,"err_write":3,"err_status":4,"err_timeout":5}'
    )
    assert parse_wrk(line).errors == 15


def test_wrk_without_the_script_line_is_an_error() -> None:
    plain = recorded("wrk_keepalive.txt").replace("JSON ", "")
    with pytest.raises(ToolOutputError, match="0 summary lines"):
        parse_wrk(plain)


def test_wrk_malformed_summary_line() -> None:
    with pytest.raises(ToolOutputError, match="malformed"):
        parse_wrk('JSON {"requests": 1}')


def test_pid_stat_utime_and_stime() -> None:
    assert parse_pid_stat_ticks(recorded("pid_stat.txt")) == (322, 94)


def test_pid_stat_command_name_with_spaces_and_parens() -> None:
    line = recorded("pid_stat.txt").replace("(python)", "(a b) c)")
    assert parse_pid_stat_ticks(line) == (322, 94)


def test_status_fields() -> None:
    text = recorded("pid_status.txt")
    assert parse_status_kib(text, "VmRSS") == 75876
    assert parse_status_kib(text, "VmHWM") == 80572
    with pytest.raises(ToolOutputError):
        parse_status_kib(text, "VmNope")


def test_host_cpu_from_proc_stat() -> None:
    cpu = parse_host_cpu(recorded("proc_stat.txt"))
    assert cpu.busy == 185194 + 9440 + 31423 + 0 + 2649
    assert cpu.steal == 3131
    assert cpu.total == cpu.busy + 209124 + 1020 + 3131


def test_cgroup_usage() -> None:
    assert parse_cgroup_usage_usec(recorded("cpu_stat.txt")) == 12546894
    with pytest.raises(ToolOutputError):
        parse_cgroup_usage_usec("user_usec 1\n")


def test_listening_ports_ipv4_and_ipv6() -> None:
    # a node netns: ztunnel's admin/metrics/readiness and the agent's metrics listen;
    # the TIME_WAIT (06) rows are connections, not listeners
    assert listening_ports(recorded("net_tcp.txt")) == {15000, 15014, 15020, 15021}
    assert listening_ports(recorded("net_tcp6.txt")) == {5999}


def test_loop_profile_keeps_only_the_busy_event_loop() -> None:
    profile = loop_profile(recorded("pyspy_raw.txt"))
    # 78 samples of the uvloop thread (the push client's thread is left out), 19 in epoll
    assert profile.samples == 78
    assert profile.busy_share == pytest.approx(59 / 78)
    top = profile.frames[0]
    assert top.name == "write (libc.so.6)"
    assert top.self_share == pytest.approx(13 / 59)
    assert all("epoll" not in f.name for f in profile.frames)
    assert sum(f.self_share for f in profile.python) <= 1.0


def test_loop_profile_merges_the_lines_of_a_function() -> None:
    collapsed = (
        "main (z.py:1);uv_run (core.c:464);f (a.py:10) 3\n"
        "main (z.py:1);uv_run (core.c:464);f (a.py:12) 2\n"
        "main (z.py:1);uv_run (core.c:464);f (a.py:12);memcpy (libc.so.6) 5\n"
        "main (z.py:1);uv_run (core.c:464);uv__io_poll (linux.c:1);epoll_wait (libc.so.6) 10\n"
        "thread (t.py:1);wait (t.py:2) 100\n"
    )
    profile = loop_profile(collapsed)
    assert (profile.samples, profile.busy_share) == (20, 0.5)
    assert [(f.name, f.self_share) for f in profile.frames] == [
        ("f (a.py)", 0.5),
        ("memcpy (libc.so.6)", 0.5),
    ]
    assert [(f.name, f.self_share, f.total_share) for f in profile.python] == [
        ("f (a.py)", 1.0, 1.0)
    ]


def test_loop_profile_of_nothing() -> None:
    assert loop_profile("").busy_share == 0.0
