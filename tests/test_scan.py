"""The page scanner: a superset disassembly that misses no sensitive instruction.

The reference for soundness is written independently of the scanner's
candidate filter: decode every offset of the page with decode_at.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from devirt_emu.cpu.decode import decode_at
from devirt_emu.cpu.scan import PAGE_SIZE, scan_page, scan_starts, store_may_change_sites
from devirt_emu.asm import keystone_engine
from devirt_emu.events import Kind

K = Kind
BASE = 0x7000_0000


def asm(text: str, mode: int = 64) -> bytes:
    return bytes(keystone_engine(mode).asm(text)[0])


def every_offset(code: bytes, base: int, mode: int) -> dict:
    """The definition scan_page must meet: decode_at at every offset of the page."""
    out = {}
    for off in range(min(len(code), PAGE_SIZE)):
        insn = decode_at(code[off:], base + off, mode)
        if insn is not None:
            out[base + off] = insn
    return out


# Ordinary x86-64 (nothing a hypervisor intercepts) and sensitive instructions
# (kind as the SDM names it), interleaved.
ORDINARY = ["mov rax, rbx", "add rax, qword ptr [rbx+8]", "lea rcx, [rdx+rsi*4+16]",
            "push rbp", "mov rbp, rsp", "sub rsp, 0x40", "cmp eax, 7", "xor edx, edx",
            "movzx eax, byte ptr [rdi]", "test rax, rax", "imul rax, rcx", "pop rbp",
            "mov qword ptr [rsp+8], r12", "shl rax, 3", "nop", "inc r9", "ret"]
SENSITIVE = [("wrmsr", K.WRMSR), ("rdmsr", K.RDMSR), ("cpuid", K.CPUID), ("out dx, al", K.OUT),
             ("in al, 0x60", K.IN), ("mov cr3, rax", K.MOV_TO_CR), ("invlpg [rdi]", K.INVLPG),
             ("hlt", K.HLT), ("pause", K.PAUSE), ("vmcall", K.VMCALL), ("rep outsb", K.OUTS),
             ("iretq", K.IRET), ("pushfq", K.PUSHF), ("cli", K.CLI), ("sti", K.STI),
             ("int 0x21", K.INT), ("rdtsc", K.RDTSC), ("lgdt [rax]", K.LGDT), ("xsetbv", K.XSETBV)]


def build_mixed_page(seed: int):
    """Assemble line by line so that every instruction start is known."""
    rng = random.Random(seed)
    code, starts_ordinary, starts_sensitive = b"", [], []
    while True:
        if rng.random() < 0.2:
            text, kind = rng.choice(SENSITIVE)
        else:
            text, kind = rng.choice(ORDINARY), None
        enc = asm(text)
        if len(code) + len(enc) > PAGE_SIZE:
            break
        (starts_sensitive.append((len(code), kind)) if kind else starts_ordinary.append(len(code)))
        code += enc
    return code.ljust(PAGE_SIZE, b"\x90"), starts_ordinary, starts_sensitive


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_code_page_every_sensitive_found_no_ordinary_start_reported(seed):
    code, ordinary, sensitive = build_mixed_page(seed)
    sites = scan_page(code, BASE, 64)
    for off, kind in sensitive:
        assert sites[BASE + off].kind is kind, off
    for off in ordinary:
        assert BASE + off not in sites, off


def test_ordinary_code_only_has_no_site_at_an_instruction_start():
    code = b"".join(asm(t) for t in ORDINARY * 30)
    starts, pos = set(), 0
    for t in ORDINARY * 30:
        starts.add(pos)
        pos += len(asm(t))
    sites = scan_page(code[:PAGE_SIZE], BASE, 64)
    assert not {a - BASE for a in sites} & starts


def test_misaligned_site_in_data():
    rng = random.Random(7)
    page = bytearray(rng.getrandbits(8) & 0x3F for _ in range(PAGE_SIZE))  # 00-3F: none is a table opcode
    page[1001:1004] = bytes.fromhex("0F 01 C1")                              # VMCALL at an odd offset
    page[2050:2052] = bytes.fromhex("0F 30")                                 # WRMSR
    sites = scan_page(bytes(page), BASE, 64)
    assert sites[BASE + 1001].kind is K.VMCALL
    assert sites[BASE + 2050].kind is K.WRMSR
    assert sites == every_offset(bytes(page), BASE, 64)


def test_jump_into_the_middle_of_an_instruction():
    # B8 0F 01 C1 90 is "mov eax, 0x90C1010F" to a linear sweep; a jump to +1 runs VMCALL.
    page = bytes.fromhex("B8 0F 01 C1 90").ljust(PAGE_SIZE, b"\x00")
    sites = scan_page(page, BASE, 64)
    assert BASE not in sites
    assert sites[BASE + 1].kind is K.VMCALL and sites[BASE + 1].length == 3


def test_instruction_crossing_the_page_end():
    page = bytearray(PAGE_SIZE)
    page[4094:4096] = bytes.fromhex("0F 01")     # VMCALL's third byte is on the next page
    tail = bytes.fromhex("C1") + bytes(14)
    sites = scan_page(bytes(page) + tail, BASE, 64)
    assert sites[BASE + 4094].kind is K.VMCALL
    assert sites[BASE + 4094].length == 3
    # Without the next page's bytes it cannot be decoded (truncated), so not reported.
    assert BASE + 4094 not in scan_page(bytes(page), BASE, 64)


def test_prefix_on_this_page_opcode_on_the_next():
    page = bytearray(PAGE_SIZE)
    page[4095] = 0xF3
    sites = scan_page(bytes(page) + b"\x90" + bytes(14), BASE, 64)
    assert sites[BASE + 4095].kind is K.PAUSE
    assert all(a < BASE + PAGE_SIZE for a in sites)   # the next page's offsets are its own scan's


def test_instruction_crossing_in_from_the_previous_page():
    # Previous page ends with 0F, this one starts with 01 C1: VMCALL starts on the previous page.
    prev = bytearray(PAGE_SIZE)
    prev[4095] = 0x0F
    this = bytearray(PAGE_SIZE)
    this[0:2] = bytes.fromhex("01 C1")
    this[2:4] = bytes.fromhex("0F 32")           # RDMSR right after the crossing instruction
    prev_sites = scan_page(bytes(prev) + bytes(this[:15]), BASE - PAGE_SIZE, 64)
    assert prev_sites[BASE - 1].kind is K.VMCALL
    sites = scan_page(bytes(this), BASE, 64)
    assert BASE not in sites and BASE + 1 not in sites
    assert sites[BASE + 2].kind is K.RDMSR


def test_every_prefix_start_is_reported():
    # 2E 66 F3 6F: from each of the four offsets a (shorter) OUTS decodes.
    page = bytes.fromhex("2E 66 F3 6F").ljust(PAGE_SIZE, b"\x00")
    sites = scan_page(page, BASE, 32)
    assert [sites[BASE + i].length for i in range(4)] == [4, 3, 2, 1]
    assert [sites[BASE + i].io_size for i in range(4)] == [2, 2, 4, 4]
    assert [sites[BASE + i].rep for i in range(4)] == [True, True, True, False]


def test_rex_is_a_prefix_only_in_64_bit_mode():
    page = bytes.fromhex("48 CF").ljust(PAGE_SIZE, b"\x00")
    s64 = scan_page(page, BASE, 64)
    assert s64[BASE].op_size == 8 and s64[BASE + 1].op_size == 4
    s32 = scan_page(page, BASE, 32)
    assert BASE not in s32 and s32[BASE + 1].kind is K.IRET


LEGACY_CODE = {  # (bytes, kind at that start); disp16 in 16-bit code, disp32 in 32-bit code
    16: [("FA", K.CLI), ("0F 01 16 34 12", K.LGDT), ("0F 20 C0", K.MOV_FROM_CR), ("E6 80", K.OUT),
         ("17", K.POP_SS), ("CE", K.INTO), ("F4", K.HLT)],
    32: [("FA", K.CLI), ("0F 01 15 34 12 00 00", K.LGDT), ("0F 20 C0", K.MOV_FROM_CR),
         ("E6 80", K.OUT), ("17", K.POP_SS), ("CE", K.INTO), ("F4", K.HLT)],
}


@pytest.mark.parametrize("mode", [16, 32])
def test_legacy_mode_code(mode):
    code, want = b"", {}
    for hexstr, kind in LEGACY_CODE[mode]:
        want[BASE + len(code)] = kind
        code += bytes.fromhex(hexstr)
    sites = scan_page(code.ljust(PAGE_SIZE, b"\x00"), BASE, mode)
    assert {a: i.kind for a, i in sites.items()} == want


@pytest.mark.parametrize("mode", [16, 32, 64])
def test_random_page_equals_decoding_every_offset(mode):
    rng = random.Random(mode)
    code = bytes(rng.getrandbits(8) for _ in range(PAGE_SIZE + 15))
    assert scan_page(code, BASE, mode) == every_offset(code, BASE, mode)


# Bytes that make sensitive instructions and their prefixes likely.
_INTERESTING = [0x0F, 0x01, 0x00, 0x20, 0x22, 0x23, 0x30, 0x32, 0x38, 0x80, 0x82, 0x78, 0x79,
                0xAE, 0xC7, 0xC1, 0xC8, 0xD8, 0xDF, 0xF0, 0xF8, 0xFA, 0xFD, 0x09,
                0x66, 0x67, 0xF2, 0xF3, 0xF0, 0x2E, 0x64, 0x65, 0x40, 0x48, 0x41, 0x44, 0x4F,
                0x90, 0x87, 0xDB, 0xC9, 0x8E, 0x17, 0xCC, 0xCD, 0xCE, 0xCF, 0xE4, 0xED, 0x6C,
                0x6F, 0x9C, 0xF4, 0x04, 0x05, 0x24, 0x25, 0x44]


@settings(max_examples=150, deadline=None)
@given(data=st.lists(st.one_of(st.sampled_from(_INTERESTING), st.integers(0, 255)), max_size=400),
       mode=st.sampled_from([16, 32, 64]))
def test_scan_is_exactly_the_superset(data, mode):
    code = bytes(data)
    sites = scan_page(code, BASE, mode)
    for addr, insn in sites.items():
        assert decode_at(code[addr - BASE:], addr, mode) == insn
    assert sites == every_offset(code, BASE, mode)


def test_bad_arguments():
    with pytest.raises(ValueError):
        scan_page(bytes(16), BASE, 8)
    with pytest.raises(ValueError):
        scan_page(bytes(16), BASE + 1, 64)
    with pytest.raises(ValueError):
        scan_page(bytes(PAGE_SIZE + 16), BASE, 64)
    assert scan_page(b"", BASE, 64) == {}


def starts_in(code: bytes, first: int, stop: int, mode: int) -> dict:
    """The definition scan_starts must meet: decode_at at every offset of [first, stop)."""
    out = {}
    for off in range(first, stop):
        insn = decode_at(code[off:], off, mode)
        if insn is not None:
            out[off] = insn
    return out


_BYTES = st.lists(st.one_of(st.sampled_from(_INTERESTING), st.integers(0, 255)),
                  min_size=48, max_size=120)


@settings(max_examples=150, deadline=None)
@given(data=_BYTES, mode=st.sampled_from([16, 32, 64]), a=st.integers(0, 120),
       b=st.integers(0, 120))
def test_scan_of_a_window_is_decoding_each_start_in_it(data, mode, a, b):
    code = bytes(data)
    first, stop = sorted((min(a, len(code)), min(b, len(code))))
    assert scan_starts(code, first, stop, mode) == starts_in(code, first, stop, mode)


@settings(max_examples=120, deadline=None)
@given(data=_BYTES, mode=st.sampled_from([16, 32, 64]), at=st.integers(4, 20),
       new=st.lists(st.one_of(st.sampled_from(_INTERESTING), st.integers(0, 255)),
                    min_size=1, max_size=8))
def test_a_store_ruled_out_changes_no_start(data, mode, at, new):
    # store_may_change_sites may only say False when no start in the 14 bytes
    # before the store or in it decodes as a sensitive instruction after it,
    # given that none did before
    old = bytes(data)
    lo, hi = at, at + len(new)
    if hi + 18 > len(old):
        return
    first = max(lo - 14, 0)
    if starts_in(old, first, hi, mode):
        return                       # the precondition: no old start near the store
    code = old[:lo] + bytes(new) + old[hi:]
    if not store_may_change_sites(code, lo, hi, mode):
        assert starts_in(code, first, hi, mode) == {}


def test_a_store_next_to_code_is_ruled_out_and_one_making_cpuid_is_not():
    code = bytes(16) + b"\x90" * 4 + b"\x34\x12" + bytes(30)   # NOPs, then a stored 0x1234
    assert not store_may_change_sites(code, 20, 28, 64)
    code = bytes(20) + b"\x0f\xa2" + bytes(30)            # the store wrote CPUID
    assert store_may_change_sites(code, 20, 22, 64)
    code = bytes(20) + b"\xf3" + b"\x90" + bytes(30)      # F3 before a 90: PAUSE
    assert store_may_change_sites(code, 20, 21, 64)
