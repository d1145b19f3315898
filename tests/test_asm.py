"""The assembler front end (devirt_emu.asm) and the firmware image layout.

Expected encodings are written from the SDM's opcode tables (vol. 2), not
taken from keystone: e.g. MOV r32, imm32 is B8+rd id; JMP rel8 is EB cb.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from devirt_emu import asm as asm_module
from devirt_emu.asm import FIRMWARE_DIR, IMAGE_BASE, AsmError, assemble, build_image

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest_tests"
GUESTS = sorted(p.name for p in GUEST_DIR.glob("*.S"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- basics

def test_symbol_table_addresses():
    src = "start:\n nop\n nop\n nop\nafter3:\n .quad 1, 2\nafter19:\n"
    data, syms = assemble(src, 0x1000)
    assert data == b"\x90" * 3 + (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    assert syms == {"start": 0x1000, "after3": 0x1003, "after19": 0x1013}


def test_local_and_numeric_labels_are_not_listed_and_resolve():
    src = ".Lhere: nop\n1: jmp 1b\n jmp 1f\n1: ret\nend:\n"
    data, syms = assemble(src, 0x2000)
    # nop; EB FE (jmp to itself, rel8 -2); EB 00 (jmp to the next 1:); C3
    assert data == bytes([0x90, 0xEB, 0xFE, 0xEB, 0x00, 0xC3])
    assert syms == {"end": 0x2006}


def test_comments_are_stripped_but_not_inside_strings():
    src = 'nop # a comment\nnop // another\nmsg: .asciz "a;b#c//d"\n'
    data, syms = assemble(src, 0)
    assert data == b"\x90\x90" + b"a;b#c//d\x00"
    assert syms["msg"] == 2


def test_a_semicolon_separates_statements_as_in_gnu_as():
    # GNU as on x86: ';' is a line separator, so this is two instructions
    # (31 C0 = xor eax, eax; 0F A2 = cpuid), and a label may start each
    data, syms = assemble("xor eax, eax; cpuid\nl1: nop; l2: ret", 0)
    assert data == bytes([0x31, 0xC0, 0x0F, 0xA2, 0x90, 0xC3])
    assert syms == {"l1": 4, "l2": 5}
    # not inside a string or a character literal, nor in a comment
    data, _ = assemble("mov al, ';'\n.ascii \"x;y\"  # a; b", 0)
    assert data == bytes([0xB0, ord(";")]) + b"x;y"


def test_a_semicolon_comment_is_now_a_statement_and_an_error_with_its_line():
    with pytest.raises(AsmError) as e:
        assemble("nop\nnop ; a comment\n", 0, "old.S")
    assert (e.value.filename, e.value.line) == ("old.S", 2)


def test_run_case_runs_both_statements_of_a_line():
    from devirt_emu.testing.vmx_case import run_case
    r = run_case("mov eax, 7; cpuid")
    assert r.exit.name == "CPUID" and r.exit.regs["rax"] == 7
    assert r.steps == 1


@pytest.mark.parametrize("line, why", [
    ("mov rax, [rbx+", "'[' is not closed"),
    ("mov rax, [rbx", "'[' is not closed"),
    ("mov rax, rbx]", "']' without a matching '['"),
    ("mov rax, (5 + 3", "'(' is not closed"),
    ("mov rax, [rbx + 8)]", "')' without a matching '('"),
    ("mov rax, 5 +", "operator '+' with no operand after it"),
    ("mov rax, [rbx + rcx*]", "operator '*' with no operand after it"),
    ("add rax, 1 <<, rbx", "operator '<<' with no operand after it"),
    (".quad 1 |", "operator '|' with no operand after it"),
])
def test_malformed_operands_are_errors_with_file_and_line(line, why):
    # keystone alone assembles the first as mov rax, [rbx], the second as a load
    # from address 0 and the fourth as mov rax, 8
    with pytest.raises(AsmError) as e:
        assemble(f"nop\n    {line}   # a comment\nnop\n", 0, "bad.S")
    assert (e.value.filename, e.value.line) == ("bad.S", 2)
    assert e.value.message == why
    assert str(e.value) == f"bad.S:2: {why}: {line}   # a comment"


def test_well_formed_operands_are_not_rejected():
    data, _ = assemble('mov rax, [rbx + rcx*4 - 8]\nmov eax, -1\nmov al, \'[\'\n'
                       '.ascii "(["\nmov eax, ~0\nmov eax, (1 << 4) | 2\n', 0)
    assert data[:5] == bytes([0x48, 0x8B, 0x44, 0x8B, 0xF8])      # REX.W 8B /r, SIB, disp8 -8
    assert data[5:10] == bytes([0xB8, 0xFF, 0xFF, 0xFF, 0xFF])
    assert data[10:12] == bytes([0xB0, ord("[")])
    assert data[12:14] == b"(["
    assert data[14:19] == bytes([0xB8, 0xFF, 0xFF, 0xFF, 0xFF])
    assert data[19:24] == bytes([0xB8, 0x12, 0, 0, 0])


def test_constants_are_folded_around_keystone_expression_bug():
    # keystone alone turns "mov eax, 100 + K" into a load from address K
    src = ".set K, 4\nmov eax, 100 + K\nmov eax, [table + K]\ntable:\n"
    data, syms = assemble(src, 0x8000)
    table = syms["table"]
    assert table == 0x8000 + 5 + 9
    # B8 id = MOV EAX, imm32 (104); A1 moffs64 = MOV EAX, [table + 4]
    assert data[:5] == bytes([0xB8, 104, 0, 0, 0])
    assert data[5:14] == bytes([0xA1]) + (table + 4).to_bytes(8, "little")


def test_segment_constant_operands_are_absolute():
    # keystone alone encodes this RIP-relative with the wrong displacement
    src = ".set OFF, 8\nmov rdi, qword ptr gs:[OFF]\n"
    data, _ = assemble(src, 0x8000)
    # 65 (GS) REX.W 8B /r with ModRM 00 111 100 (SIB), SIB 00 100 101 (no base, no index), disp32
    assert data == bytes([0x65, 0x48, 0x8B, 0x3C, 0x25, 8, 0, 0, 0])


# ----------------------------------------------------------------------------- includes and sections

def test_include_relative_then_firmware_dir(tmp_path):
    write(tmp_path / "sub" / "part.S", '.include "defs.S"\npart: mov ecx, MSR_EFER\n')
    main = write(tmp_path / "main.S", 'first: nop\n.include "sub/part.S"\nlast: ret\n')
    data, syms = assemble(main.read_text(), 0x8000, str(main))
    # defs.S came from firmware/ (not next to part.S); MSR_EFER = 0xC0000080 (SDM vol. 4)
    assert data == b"\x90" + bytes([0xB9]) + (0xC0000080).to_bytes(4, "little") + b"\xC3"
    assert syms["first"] == 0x8000 and syms["part"] == 0x8001 and syms["last"] == 0x8006


def test_data_and_rodata_start_on_their_own_pages():
    src = (".text\ncode1: nop\n.data\nvar: .quad 7\n.rodata\nmsg: .asciz \"hi\"\n"
           ".text\ncode2: ret\n.data\nvar2: .long 9\n")
    data, syms = assemble(src, 0x8000)
    assert syms["code1"] == 0x8000 and syms["code2"] == 0x8001        # code stays together
    assert syms["_rodata_start"] == syms["msg"] == 0x9000             # next page
    assert syms["_data_start"] == syms["var"] == 0xA000               # page after that
    assert syms["var2"] == 0xA008
    assert data[0x1000:0x1003] == b"hi\x00"
    assert data[0x2000:0x2008] == (7).to_bytes(8, "little")
    # the padding between is zeros, not instructions
    assert data[2:0x1000] == bytes(0x1000 - 2)


def test_data_keeps_the_mode_of_where_it_was_written():
    src = ".code32\n.data\nd32: push eax\n.text\n.code64\nc64: push rax\n"
    data, syms = assemble(src, 0)
    assert data[0] == 0x50 and data[syms["d32"]] == 0x50


def test_macros_are_hoisted_so_data_may_use_them():
    src = ".data\nWORDS 3\n.text\n.macro WORDS n\n.rept \\n\n.word 0xABCD\n.endr\n.endm\nnop\n"
    data, syms = assemble(src, 0)
    assert data[syms["_data_start"]:] == bytes.fromhex("cdab") * 3


# ----------------------------------------------------------------------------- errors

def test_bad_mnemonic_in_included_file_names_file_and_line(tmp_path):
    inc = write(tmp_path / "inc.S", "nop\nnop\n  frobnicate eax\nnop\n")
    main = write(tmp_path / "main.S", 'nop\n.include "inc.S"\nret\n')
    with pytest.raises(AsmError) as e:
        assemble(main.read_text(), 0x8000, str(main))
    assert e.value.filename == str(inc) and e.value.line == 3
    assert "mnemonic" in str(e.value).lower()
    assert str(e.value).startswith(f"{inc}:3: ")


def test_undefined_symbol_is_told_apart(tmp_path):
    main = write(tmp_path / "main.S", "nop\njmp later\ncall nowhere\nlater: ret\n")
    with pytest.raises(AsmError) as e:
        assemble(main.read_text(), 0, str(main))
    assert e.value.line == 3 and "undefined symbol 'nowhere'" in str(e.value)


def test_operand_error_after_forward_references(tmp_path):
    main = write(tmp_path / "main.S", "jmp fwd\nand rax, 0x80000000\nfwd: ret\n")
    with pytest.raises(AsmError) as e:
        assemble(main.read_text(), 0, str(main))
    assert e.value.line == 2


def test_missing_include_and_recursion(tmp_path):
    main = write(tmp_path / "main.S", 'nop\n.include "nope.S"\n')
    with pytest.raises(AsmError, match=r"main\.S:2: cannot find include file"):
        assemble(main.read_text(), 0, str(main))
    loop = write(tmp_path / "loop.S", '.include "loop.S"\n')
    with pytest.raises(AsmError, match="recursive"):
        assemble(loop.read_text(), 0, str(loop))


def test_unsupported_section_directive(tmp_path):
    main = write(tmp_path / "main.S", "nop\n.section .bss\n")
    with pytest.raises(AsmError) as e:
        assemble(main.read_text(), 0, str(main))
    assert e.value.line == 2 and ".data" in str(e.value)


def test_missing_guest_file(tmp_path):
    with pytest.raises(AsmError, match="no such file"):
        build_image(tmp_path / "absent.S")


# ----------------------------------------------------------------------------- cache

def test_cache_hit_does_not_call_keystone(monkeypatch):
    src = "a: mov eax, 1\nb: ret\n"
    first = assemble(src, 0x4000)

    def no_keystone(*a, **k):
        raise AssertionError("keystone called although the result is cached")

    monkeypatch.setattr(asm_module, "_ks_run", no_keystone)
    assert assemble(src, 0x4000) == first
    with pytest.raises(AssertionError):            # another base is another key
        assemble(src, 0x5000)


def test_unwritable_cache_still_assembles(tmp_path, monkeypatch):
    blocker = write(tmp_path / "not-a-dir", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert assemble("nop\n", 0)[0] == b"\x90"


# ----------------------------------------------------------------------------- the image

@pytest.fixture(scope="module")
def firmware_image():
    return build_image(None)


def test_image_contract(firmware_image):
    im = firmware_image
    assert im.base == IMAGE_BASE == 0x8000
    assert im.ap_sipi_vector == 0x08                      # CS = 0x0800, IP = 0 -> 0x8000
    assert im.symbols["ap_entry"] == im.base and im.data[0] == 0xFA   # CLI
    assert im.entry32 == im.symbols["_start32"]
    assert im.symbols["_image_end"] == im.base + len(im.data)
    assert im.code_end <= im.data_start
    assert im.data_start % 4096 == 0 and im.code_end % 4096 == 0
    for name in ("fw_pml4", "fw_idt", "fw_gdt", "fw_percpu", "fw_handler_table"):
        assert im.symbols[name] >= im.data_start, name     # written data off the code pages


def test_each_cpu_mode_has_its_own_code_page(firmware_image):
    s = firmware_image.symbols
    page = lambda a: a >> 12  # noqa: E731
    assert page(s["ap_entry"]) != page(s["_start32"])
    assert page(s["_start32"]) == page(s["fw_ap_protected"])
    assert page(s["_start32"]) != page(s["fw_bsp_long"])
    assert page(s["fw_bsp_long"]) <= page(s["fw_ap_long"])


def test_idt_stubs_push_the_right_vector(firmware_image):
    """Stub v is at isr_stubs + 16 v; it pushes a 0 unless the CPU pushes an
    error code (SDM vol. 3A table 6-1: #DF 8, #TS 10, #NP 11, #SS 12, #GP 13,
    #PF 14, #AC 17, #CP 21; APM: #VC 29, #SX 30), then the vector."""
    im = firmware_image
    with_error_code = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    stubs = im.symbols["fw_isr_stubs"]
    common = im.symbols["fw_isr_common"]
    for v in range(256):
        at = stubs + 16 * v
        code = im.data[at - im.base: at - im.base + 16]
        insns = [(i.mnemonic, i.op_str) for i in md.disasm(code, at)]
        expected = [] if v in with_error_code else [("push", "0")]
        expected += [("push", hex(v) if v > 9 else str(v)), ("jmp", hex(common))]
        assert insns[:len(expected)] == expected, v


def test_lib_table_lists_the_library(firmware_image):
    s = firmware_image.symbols
    t = s["lib_table"] - firmware_image.base
    q = lambda i: int.from_bytes(firmware_image.data[t + 8 * i: t + 8 * i + 8], "little")  # noqa: E731
    order = ["print", "print_hex", "print_dec", "putc", "pass", "fail", "rdtsc64", "this_cpu",
             "num_cpus", "send_ipi", "eoi", "timer_oneshot", "timer_periodic", "timer_stop",
             "tsc_deadline", "spin_lock", "spin_unlock", "set_handler", "steady_begin",
             "steady_end", "barrier", "timer_divide", "delay_ns", "tsc_hz", "timer_current",
             "fail_msg", "report_ok"]
    assert q(0) == len(order)
    assert [q(i + 1) for i in range(len(order))] == [s[n] for n in order]


def test_markers_are_the_bochs_magic_xchg(firmware_image):
    s, d, b = firmware_image.symbols, firmware_image.data, firmware_image.base
    assert d[s["steady_begin"] - b: s["steady_begin"] - b + 4] == bytes.fromhex("6687dbc3")
    assert d[s["steady_end"] - b: s["steady_end"] - b + 4] == bytes.fromhex("6687c9c3")


@pytest.mark.parametrize("guest", GUESTS)
def test_every_guest_test_assembles(guest):
    im = build_image(GUEST_DIR / guest)
    assert "guest_main" in im.symbols
    assert im.base <= im.symbols["guest_main"] < im.code_end


def test_firmware_sources_exist():
    for name in ("boot.S", "lib.S", "defs.S", "no_guest.S"):
        assert (FIRMWARE_DIR / name).is_file()


def test_keystone_engines_read_decimal_numbers():
    # keystone 0.9.2 leaves the radix uninitialised: the engines used are probed
    from devirt_emu.asm import keystone_engine
    for mode, expected in ((16, b"\xb8\x0a\x00"), (32, b"\xb8\x0a\x00\x00\x00"),
                           (64, b"\xb8\x0a\x00\x00\x00")):
        assert bytes(keystone_engine(mode).asm("mov eax, 10" if mode != 16 else "mov ax, 10")[0]) \
            == expected
