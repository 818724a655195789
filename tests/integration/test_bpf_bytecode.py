"""The compiled programs hold none of the shapes Linux 6.1's verifier refuses.

6.1's verifier (Debian 12) refuses what newer kernels accept, so the datapath tests on
this machine cannot catch it; `make test-vagrant` loads the programs on 6.1 for real. This
compiles the programs as the loader does (bcc, same text and flags) and scans each one's
bytecode for the two shapes met there:

- a store narrower than 8 bytes into a stack slot whose first bytes hold a spilled
  register ("attempt to corrupt spilled pointer on stack", unless the loader may leak
  pointers). Conservatively: any register store at the start of an 8-byte slot counts as
  a spill (the verifier spills pointers and bounded scalars of any width there), and any
  narrow store into that slot later in program order is reported. bpf/src/maps.h says
  how the C avoids them.
- a map lookup's result tested for null by two instructions: on 6.1 the register reaches
  the second test as a plain scalar once the paths have joined ("invalid mem access
  'scalar'"). Followed through register copies and 8-byte stack spills, in program order;
  bpf/src/fastpath.c looks the value up again instead.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import pytest

from bpf.loader import (
    _FASTPATH_COUNTERS,
    _FASTPATH_PROGRAM,
    _POD_CGROUP_PROGRAMS,
    _PROXY_PROGRAM,
    _SK_LOOKUP_PROGRAM,
    MeshBpf,
    cflags,
)
from tests.integration.privileged import require_privileged

PROGRAMS = [
    *(p[0] for p in (*_POD_CGROUP_PROGRAMS, _PROXY_PROGRAM, _SK_LOOKUP_PROGRAM, _FASTPATH_PROGRAM)),
    *(name.decode() for name in _FASTPATH_COUNTERS.values()),
]

# include/uapi/linux/bpf.h and bpf_common.h
_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: two instruction slots
_CLASS_ST, _CLASS_STX = 0x02, 0x03
_MODE_MEM = 0x60
_SIZE_BYTES = {0x00: 4, 0x08: 2, 0x10: 1, 0x18: 8}  # BPF_W, BPF_H, BPF_B, BPF_DW
_FP = 10  # the read-only frame pointer
_CLASS_LDX, _CLASS_JMP, _CLASS_JMP32, _CLASS_ALU, _CLASS_ALU64 = 0x01, 0x05, 0x06, 0x04, 0x07
_CALL, _MOV64_X, _LDX_DW, _STX_DW = 0x85, 0xBF, 0x79, 0x7B
_JEQ, _JNE = 0x10, 0x50
_MAP_LOOKUP_ELEM = 1


def narrow_stores_into_spills(bytecode: bytes) -> list[str]:
    """Each narrow stack store into a slot that received a register store at its start."""
    spilled: dict[int, int] = {}  # slot (offset // 8) -> index of the spilling insn
    found = []
    index = 0
    while index < len(bytecode) // 8:
        code, regs, off, _ = struct.unpack_from("<BBhi", bytecode, index * 8)
        if code == _LD_IMM64:
            index += 2
            continue
        klass, size = code & 0x07, _SIZE_BYTES[code & 0x18]
        if klass in (_CLASS_ST, _CLASS_STX) and code & 0xE0 == _MODE_MEM and regs & 0x0F == _FP:
            slot = off // 8
            if size < 8 and slot in spilled:
                found.append(
                    f"insn {index}: *(u{size * 8} *)(r10 {off}) = ..., "
                    f"into the slot insn {spilled[slot]} spilled a register to"
                )
            if klass == _CLASS_STX and off % 8 == 0:
                spilled[slot] = index
            elif size == 8:  # an immediate overwrites the whole slot: no spill left
                spilled.pop(slot, None)
        index += 1
    return found


def lookups_null_tested_twice(bytecode: bytes) -> list[str]:
    """Each map lookup (by its call's index) whose result two instructions test for null."""
    holds: dict[int, int] = {}  # register -> index of the lookup call whose result it holds
    spills: dict[int, int] = {}  # stack slot -> the same
    tests: dict[int, list[int]] = {}
    index = 0
    while index < len(bytecode) // 8:
        code, regs, off, imm = struct.unpack_from("<BBhi", bytecode, index * 8)
        dst, src, klass = regs & 0x0F, regs >> 4, code & 0x07
        if code == _LD_IMM64:
            holds.pop(dst, None)
            index += 2
            continue
        if code == _CALL:
            for clobbered in range(6):
                holds.pop(clobbered, None)
            if imm == _MAP_LOOKUP_ELEM:
                holds[0] = index
        elif klass in (_CLASS_JMP, _CLASS_JMP32) and code & 0xF0 in (_JEQ, _JNE):
            if not code & 0x08 and imm == 0 and dst in holds:
                tests.setdefault(holds[dst], []).append(index)
        elif code == _MOV64_X and src in holds:
            holds[dst] = holds[src]
        elif klass in (_CLASS_ALU, _CLASS_ALU64, _CLASS_LDX):
            holds.pop(dst, None)
            if code == _LDX_DW and src == _FP and off // 8 in spills:
                holds[dst] = spills[off // 8]
        elif klass in (_CLASS_ST, _CLASS_STX) and dst == _FP:
            spills.pop(off // 8, None)
            if code == _STX_DW and src in holds:
                spills[off // 8] = holds[src]
        index += 1
    return [
        f"the lookup at insn {call} is tested for null at insns {', '.join(map(str, at))}"
        for call, at in tests.items()
        if len(at) > 1
    ]


def _insn(code: int, dst: int, src: int, off: int, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | src << 4, off, imm)


def test_scan_finds_what_linux_6_1_rejected() -> None:
    """The instructions of the old connect4 that Debian 12's kernel refused:
    ``*(u32 *)(r10 -24) = r1`` (a 32-bit scalar, spilled), then ``*(u16 *)(r10 -20) = r1``."""
    stx_w, stx_h, stx_dw, st_dw = 0x63, 0x6B, 0x7B, 0x7A
    old = _insn(stx_w, _FP, 1, -24) + _insn(0xBF, 2, _FP, 0) + _insn(stx_h, _FP, 1, -20)
    assert narrow_stores_into_spills(old) == [
        "insn 2: *(u16 *)(r10 -20) = ..., into the slot insn 0 spilled a register to"
    ]
    whole_words = _insn(stx_dw, _FP, 1, -24) + _insn(stx_dw, _FP, 2, -16)
    assert narrow_stores_into_spills(whole_words) == []
    other_slot = _insn(stx_w, _FP, 1, -24) + _insn(stx_h, _FP, 1, -12)
    assert narrow_stores_into_spills(other_slot) == []
    overwritten = _insn(stx_dw, _FP, 1, -24) + _insn(st_dw, _FP, 0, -24) + _insn(stx_h, _FP, 1, -20)
    assert narrow_stores_into_spills(overwritten) == []
    lddw = _insn(_LD_IMM64, 1, 0, 0) + _insn(0, 0, 0, 0)
    assert narrow_stores_into_spills(_insn(stx_dw, _FP, 1, -8) + lddw + _insn(stx_w, _FP, 1, -4))


def test_scan_finds_the_null_test_linux_6_1_lost() -> None:
    """The shape of the sk_msg program Debian 12's kernel refused: ``r8 = r0`` after a
    lookup, ``if r8 == 0`` at its start, and again (after a spill and fill) at its end."""
    lookup, jeq, jne = _insn(_CALL, 0, 0, 0, _MAP_LOOKUP_ELEM), 0x15, 0x55
    old = (
        lookup
        + _insn(_MOV64_X, 8, 0, 0)
        + _insn(jeq, 8, 0, 3)
        + _insn(_STX_DW, _FP, 8, -112)
        + _insn(_CALL, 0, 0, 0, 14)  # another helper clobbers r0-r5, not r8 or the stack
        + _insn(_LDX_DW, 1, _FP, -112)
        + _insn(jne, 1, 0, 1)
    )
    assert lookups_null_tested_twice(old) == [
        "the lookup at insn 0 is tested for null at insns 2, 6"
    ]
    looked_up_again = lookup + _insn(jeq, 0, 0, 1) + lookup + _insn(jeq, 0, 0, 1)
    assert lookups_null_tested_twice(looked_up_again) == []
    overwritten = lookup + _insn(jeq, 0, 0, 1) + _insn(0xB7, 0, 0, 0, 1) + _insn(jeq, 0, 0, 1)
    assert lookups_null_tested_twice(overwritten) == []


@pytest.fixture(scope="module")
def compiled() -> Iterator[Any]:
    require_privileged()  # bcc creates the maps while compiling
    import bcc

    module = bcc.BPF(text=MeshBpf.source().encode(), cflags=cflags())
    try:
        yield module
    finally:
        module.cleanup()


@pytest.mark.privileged
@pytest.mark.parametrize("program", PROGRAMS)
def test_no_narrow_store_into_a_spilled_slot(compiled: Any, program: str) -> None:
    bytecode = compiled.dump_func(program.encode())
    assert bytecode, program
    assert narrow_stores_into_spills(bytecode) == [], compiled.disassemble_func(program.encode())


@pytest.mark.privileged
@pytest.mark.parametrize("program", PROGRAMS)
def test_no_lookup_is_tested_for_null_twice(compiled: Any, program: str) -> None:
    bytecode = compiled.dump_func(program.encode())
    assert lookups_null_tested_twice(bytecode) == [], compiled.disassemble_func(program.encode())
