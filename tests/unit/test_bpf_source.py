"""bpf/ without privileges: the compiled text, flags, counter names, address keys."""

from __future__ import annotations

import re
import socket
import struct

import pytest

from bpf import __main__ as bpf_main
from bpf.loader import SOURCE_FILES, SRC_DIR, BpfError, MeshBpf, cflags
from bpf.maps import COUNTERS, OrigDst, ip4_key


def test_source_is_the_header_then_every_program_in_order() -> None:
    text = MeshBpf.source()
    positions = [text.index((SRC_DIR / name).read_text()) for name in SOURCE_FILES]
    assert SOURCE_FILES[0] == "maps.h"
    assert positions == sorted(positions)
    programs = ("connect4", "connect6", "sockops", "getsockopt", "getpeername4", "getpeername6")
    for program in (*programs, "sk_lookup", "fastpath"):
        assert f"int ambimesh_{program}(" in text
        assert f"{program}.c" in SOURCE_FILES


def test_every_c_file_in_src_is_compiled() -> None:
    on_disk = {p.name for p in SRC_DIR.iterdir() if p.suffix in (".c", ".h")}
    assert on_disk == set(SOURCE_FILES)


def test_counter_names_match_the_c_enum() -> None:
    header = (SRC_DIR / "maps.h").read_text()
    enum = dict(re.findall(r"COUNTER_(\w+) = (\d+)", header))
    assert int(enum.pop("MAX")) == len(COUNTERS)
    assert sorted(enum.items(), key=lambda kv: int(kv[1])) == [
        (name.upper(), str(i)) for i, name in enumerate(COUNTERS)
    ]


def test_cflags_carry_the_ports() -> None:
    flags = cflags(25001, 25006, 25008)
    assert f"-I{SRC_DIR}" in flags
    assert "-DAMBIMESH_OUTBOUND_PORT=25001" in flags
    assert "-DAMBIMESH_INBOUND_PORT=25006" in flags
    assert "-DAMBIMESH_HBONE_PORT=25008" in flags


@pytest.mark.parametrize("ports", [(0, 15006, 15008), (15001, 70000, 15008), (15001, 15001, 15008)])
def test_cflags_reject_bad_ports(ports: tuple[int, int, int]) -> None:
    with pytest.raises(BpfError, match="port"):
        cflags(*ports)


def test_dump_prints_flags_and_source(capsys: pytest.CaptureFixture[str]) -> None:
    assert bpf_main.main(["--dump", "--outbound-port", "25001"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("/* cflags: ")
    assert "-DAMBIMESH_OUTBOUND_PORT=25001" in out.splitlines()[0]
    assert out.endswith(MeshBpf.source())


def test_ip4_key_is_network_order_in_memory() -> None:
    assert struct.pack("=I", ip4_key("198.18.1.2")) == socket.inet_aton("198.18.1.2")
    for bad in ("198.18.1", "::1", "example.com", "1.2.3.256"):
        with pytest.raises(ValueError):
            ip4_key(bad)


def test_orig_dst_decodes_network_order() -> None:
    dst = OrigDst(ip4=ip4_key("198.18.9.9"), port=socket.htons(80))
    assert dst.address == ("198.18.9.9", 80)
