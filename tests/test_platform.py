"""The native platform: exact counting, IDT delivery as the SDM defines it,
#DF and triple fault, MSRs, the interrupt shadow, determinism.

Programs run from the documented fresh 64-bit state of
devirt_emu.platform.longmode (no firmware), so each test sees one mechanism.
Expected values are the SDM's (Vol. 3A "Interrupt and Exception Handling":
"64-Bit Mode Stack Frame", "Error Code", "Double Fault Exception").
"""
from __future__ import annotations

import struct

import pytest

from devirt_emu.asm import assemble
from devirt_emu.machine import Machine, run_program
from devirt_emu.platform import longmode as LM
from devirt_emu.platform.ucinternals import calibrate

CODE = 0x200000
LOG = 0x300000          # the test programs' handlers write what they see here


def run64(source: str, gates: dict[str, list[int]] | None = None, *, ist: dict[int, int] | None = None,
          trap: set[int] = frozenset(), cores: int = 1, max_ns: int = 10_000_000) -> Machine:
    """Assemble ``source`` at CODE, point the IDT vectors of ``gates`` (label -> vectors)
    at their labels, run on core 0 from the fresh 64-bit state until a verdict."""
    code, syms = assemble(source, CODE, "test.S")
    m = Machine(cores=cores, max_ns=max_ns, wall_timeout_s=60)
    idt = {}
    for label, vectors in (gates or {}).items():
        for v in vectors:
            idt[v] = LM.idt_gate(syms[label], ist=(ist or {}).get(v, 0), trap=v in trap)
    LM.write_environment(m, idt)
    m.write_phys(CODE, code)
    LM.enter(m.cores[0], CODE)
    m.syms = syms
    m.boot(prepared=True)
    m.run()
    return m


def u64s(m: Machine, pa: int, n: int) -> list[int]:
    return list(struct.unpack(f"<{n}Q", m.mem.read(pa, 8 * n)))


PASS = "    mov al, 0\n    out 0xf4, al\n"


def test_calibration_finds_every_hidden_field():
    off = calibrate()
    assert len({off.mode, off.counter, off.cpu_ptr}) == 3
    assert off.error_code != off.old_exception


def test_instruction_counts_are_exact():
    # 3 + 1000 * 2 + 2 instructions up to and including the OUT that ends the run
    m = run64("    mov ecx, 1000\n    nop\n    nop\n1:  dec ecx\n    jnz 1b\n" + PASS)
    assert m.verdict == "pass"
    assert m.cores[0].icount == 3 + 2 * 1000 + 2


FRAME_HANDLER = """
handler_ec:                 # error-code frame: EC, RIP, CS, RFLAGS, RSP, SS
    mov rax, [rsp]
    mov [LOG], rax
    mov rax, [rsp + 8]
    mov [LOG + 8], rax
    mov rax, [rsp + 16]
    mov [LOG + 16], rax
    mov rax, [rsp + 24]
    mov [LOG + 24], rax
    mov rax, [rsp + 32]
    mov [LOG + 32], rax
    mov rax, [rsp + 40]
    mov [LOG + 40], rax
    mov [LOG + 48], rsp
    mov rax, cr2
    mov [LOG + 56], rax
""" + PASS


def test_page_fault_frame_and_error_code():
    # SDM: #PF pushes an error code (P=0: not present, W/R=1: write); CR2 = the address;
    # the frame is SS, RSP, RFLAGS, CS, RIP (of the faulting instruction), error code.
    src = f"""
.set LOG, {LOG:#x}
    mov rsp, 0x9F000 - 8      # misaligned on purpose: the frame is 16-byte aligned
    pushfq
    pop rbx
    mov [LOG + 64], rbx
fault:
    mov qword ptr [0x40000000], 1
""" + FRAME_HANDLER
    m = run64(src, {"handler_ec": [14]})
    ec, rip, cs, rflags, rsp, ss, handler_rsp, cr2 = u64s(m, LOG, 8)
    assert m.verdict == "pass"
    assert ec == 0b10                      # not present, write, supervisor
    assert rip == m.syms["fault"]
    assert cs == LM.KERNEL_CS
    assert rflags == u64s(m, LOG + 64, 1)[0]
    assert rsp == 0x9F000 - 8
    assert ss == LM.KERNEL_DS
    assert handler_rsp == 0x9F000 - 8 - 8 - 48 and (handler_rsp + 48) % 16 == 0
    assert cr2 == 0x40000000


def test_general_protection_error_code_zero_and_read_fault():
    src = f"""
.set LOG, {LOG:#x}
    mov rax, [0x40000008]
""" + FRAME_HANDLER
    m = run64(src, {"handler_ec": [14]})
    assert u64s(m, LOG, 1)[0] == 0         # #PF read of a not-present page: error code 0
    src = f"""
.set LOG, {LOG:#x}
    mov rax, 0x8000000000000000
fault:
    mov rax, [rax]                          # non-canonical: #GP(0)
""" + FRAME_HANDLER
    m = run64(src, {"handler_ec": [13]})
    ec, rip = u64s(m, LOG, 2)
    assert (ec, rip) == (0, m.syms["fault"])


@pytest.mark.parametrize("insn,vector", [("ud2", 6), ("xor ecx, ecx\n    div ecx", 0)])
def test_faults_without_error_code(insn, vector):
    # #UD and #DE push no error code: [rsp] is the RIP of the faulting instruction
    src = f"""
.set LOG, {LOG:#x}
    xor edx, edx
fault:
    {insn}
handler:
    mov rax, [rsp]
    mov [LOG], rax
    mov rax, [rsp + 8]
    mov [LOG + 8], rax
""" + PASS
    m = run64(src, {"handler": [vector]})
    rip, cs = u64s(m, LOG, 2)
    assert m.verdict == "pass"
    assert cs == LM.KERNEL_CS
    if vector == 6:
        assert rip == m.syms["fault"]
    else:
        assert rip == m.syms["fault"] + 2      # after xor ecx, ecx: the div itself


def test_software_interrupt_returns_after_the_instruction_and_gate_types():
    # INT n pushes the address of the next instruction; an interrupt gate clears IF,
    # a trap gate leaves it (SDM "Interrupt and trap gates").
    src = f"""
.set LOG, {LOG:#x}
    sti
    int 0x40
after40:
    int 0x41
after41:
""" + PASS + """
h40:
    pushfq
    pop rax
    mov [LOG], rax
    mov rax, [rsp]
    mov [LOG + 8], rax
    iretq
h41:
    pushfq
    pop rax
    mov [LOG + 16], rax
    iretq
"""
    m = run64(src, {"h40": [0x40], "h41": [0x41]}, trap={0x41})
    fl40, ret40, fl41 = u64s(m, LOG, 3)
    assert m.verdict == "pass"
    assert ret40 == m.syms["after40"]
    assert not fl40 & (1 << 9)
    assert fl41 & (1 << 9)


def test_ist_switches_the_stack():
    src = f"""
.set LOG, {LOG:#x}
    int3
""" + PASS + """
h:
    mov [LOG], rsp
    iretq
"""
    m = run64(src, {"h": [3]}, ist={3: 1})
    assert u64s(m, LOG, 1)[0] == LM.IST1_TOP - 40      # 5 quadwords on the IST1 stack


def test_double_fault_then_triple_fault():
    # #GP whose gate is not present -> #NP while delivering a contributory
    # exception -> #DF (SDM Table "Conditions for Generating a Double Fault").
    src = f"""
.set LOG, {LOG:#x}
    mov rax, 0x8000000000000000
    mov rax, [rax]
df:
    mov rax, [rsp]
    mov [LOG], rax
""" + PASS
    m = run64(src, {"df": [8]})
    assert m.verdict == "pass"
    assert u64s(m, LOG, 1)[0] == 0                    # #DF's error code is 0
    # with no #DF gate either, the processor shuts down
    m = run64("    mov rax, 0x8000000000000000\n    mov rax, [rax]\n" + PASS)
    assert m.verdict == "shutdown"
    assert "triple fault" in m.message


def test_unknown_msr_raises_gp_and_known_msr_round_trips():
    src = f"""
.set LOG, {LOG:#x}
    mov ecx, 0xC0000102        # KERNEL_GS_BASE
    mov eax, 0x12345678
    mov edx, 0x7FFF
    wrmsr
    xor eax, eax
    xor edx, edx
    rdmsr
    mov [LOG], eax
    mov [LOG + 4], edx
    mov ecx, 0x12345           # no such MSR
fault:
    rdmsr
handler_ec:
    mov rax, [rsp]
    mov [LOG + 8], rax
    mov rax, [rsp + 8]
    mov [LOG + 16], rax
""" + PASS
    m = run64(src, {"handler_ec": [13]})
    value, ec, rip = u64s(m, LOG, 3)
    assert value == 0x00007FFF12345678
    assert (ec, rip) == (0, m.syms["fault"])


def test_interrupt_after_sti_waits_one_instruction():
    # A self-IPI is pending while IF=0; STI opens the window only after the next
    # instruction (SDM "STI": interrupt shadow). The handler records how many of
    # the following INCs had run: exactly one.
    src = f"""
.set LOG, {LOG:#x}
    mov ecx, 0x1B              # IA32_APIC_BASE: enable the x2APIC
    rdmsr
    or eax, 0xC00
    wrmsr
    mov ecx, 0x80F             # SVR: software enable
    mov eax, 0x1FF
    xor edx, edx
    wrmsr
    xor r8, r8
    mov ecx, 0x830             # ICR: fixed, vector 0x50, to self (x2APIC ID 0)
    mov eax, 0x50
    xor edx, edx
    wrmsr
    sti
    inc r8
    inc r8
    inc r8
    cli
    mov [LOG + 8], r8
""" + PASS + """
h:
    mov [LOG], r8
    mov ecx, 0x80B
    xor eax, eax
    xor edx, edx
    wrmsr
    iretq
"""
    m = run64(src, {"h": [0x50]})
    assert m.verdict == "pass"
    assert u64s(m, LOG, 2) == [1, 3]


def test_hlt_with_nothing_to_wake_it_ends_halted():
    m = run64("    cli\n    hlt\n" + PASS)
    assert m.verdict == "halted"


def test_platform_write_into_code_is_seen():
    # self-modifying code: the store into a scanned, executed page is honoured
    src = """
    mov ecx, 2
again:
patch:
    mov eax, 1
    dec ecx
    jz done
    mov byte ptr [patch + 1], 0       # mov eax, 1 -> mov eax, 0
    jmp again
done:
    out 0xf4, al
"""
    m = run64(src)
    assert m.verdict == "pass"              # eax was 0: the patched instruction ran


def test_store_into_the_next_instruction_is_honoured():
    # the store is on the page it runs from, into the bytes right after it
    src = """
    mov byte ptr [next + 1], 0       # next: mov eax, 1 -> mov eax, 0
next:
    mov eax, 1
    out 0xf4, al
"""
    m = run64(src)
    assert m.verdict == "pass", m.message


def run_high(source: str) -> Machine:
    """Run ``source`` at linear 0x40000000, mapped (2 MiB page) to physical CODE:
    code whose linear and physical addresses differ, as in a higher-half kernel."""
    base = 0x40000000
    code, _ = assemble(source, base, "high.S")
    m = Machine(cores=1, max_ns=10_000_000, wall_timeout_s=60)
    LM.write_environment(m)
    pdpt = struct.unpack_from("<Q", m.mem.read(LM.PML4, 8))[0] & ~0xFFF
    pd = 0x380000
    m.mem.write(pdpt + 8, struct.pack("<Q", pd | 3))             # PDPT[1]: 1 GiB at 0x40000000
    m.mem.write(pd, struct.pack("<Q", CODE | 0x83))               # PD[0]: 2 MiB page at CODE
    m.write_phys(CODE, code)
    LM.enter(m.cores[0], base)
    m.boot(prepared=True)
    m.run()
    return m


def test_sensitive_instructions_are_caught_where_linear_and_physical_differ():
    # the OUT to the exit port must be caught at its linear address 0x4000000x
    # (Unicorn reports the physical address of the faulting fetch)
    m = run_high("    mov eax, 1\n    cpuid\n" + PASS)
    assert m.verdict == "pass", m.message
    assert m.cores[0].events.get("CPUID") == 1


def test_store_into_code_where_linear_and_physical_differ():
    m = run_high("""
    mov byte ptr [next + 1], 0       # next: mov eax, 1 -> mov eax, 0
next:
    mov eax, 1
    out 0xf4, al
""")
    assert m.verdict == "pass", m.message


def test_an_instruction_storing_into_its_own_bytes_executes_as_on_hardware():
    # SDM Vol. 3A "Self-Modifying Code": the store lands and execution goes on; this
    # one writes the value its first byte already holds
    m = run64("""
    lea rax, [rip]
    mov byte ptr [rax], 0x48       # stores into its own first byte (no change in value)
""" + PASS)
    assert m.verdict == "pass", m.message


def test_two_runs_give_identical_traces(tmp_path):
    from pathlib import Path
    guest = Path(__file__).resolve().parent.parent / "guest_tests" / "ipi_pingpong.S"
    traces = []
    for _ in range(2):
        events = []
        res = run_program(guest, cores=4, trace=lambda core, ev: events.append(
            (ev.core, ev.kind.value, ev.rip, core.retired_now(), ev.vector)))
        assert res.verdict == "pass"
        traces.append((events, res.instructions, res.virtual_ns, res.serial))
    assert traces[0] == traces[1]
    assert len(traces[0][0]) > 1000


def test_fast_mode_runs_and_says_so():
    from pathlib import Path
    guest = Path(__file__).resolve().parent.parent / "guest_tests" / "lapic_timer.S"
    res = run_program(guest, cores=1, fast=True)
    assert res.verdict == "pass"
    assert res.mode == "fast"


def run64_xapic(source: str, gates: dict[str, list[int]] | None = None) -> Machine:
    """run64 with the xAPIC page mapped: the guest's page tables identity-map RAM
    only, so GiB 3 (0xC0000000-0xFFFFFFFF, the local APIC at 0xFEE00000) is added
    as one 1 GiB page, uncached (PCD)."""
    code, syms = assemble(source, CODE, "test.S")
    m = Machine(cores=1, max_ns=10_000_000, wall_timeout_s=60)
    LM.write_environment(m, {v: LM.idt_gate(syms[label]) for label, vs in (gates or {}).items()
                             for v in vs})
    m.write_phys(LM.PML4 + 0x1000 + 3 * 8, struct.pack("<Q", 0xC0000000 | 0x93))
    m.write_phys(CODE, code)
    LM.enter(m.cores[0], CODE)
    m.syms = syms
    m.boot(prepared=True)
    m.run()
    return m


def test_xapic_mmio_write_retires_once():
    # SVR (offset 0F0H): a write then a read through the memory-mapped xAPIC
    m = run64_xapic("""
        mov rbx, 0xFEE000F0
        mov dword ptr [rbx], 0x1FF
        mov eax, dword ptr [rbx]
        mov [0x300000], rax
    """ + PASS)
    assert m.verdict == "pass", m.message
    assert u64s(m, LOG, 1) == [0x1FF]           # SVR reads back (APIC enabled, vector FFH)
    assert m.cores[0].icount == 6                # each instruction retired exactly once
    assert m.cores[0].events["APIC_ACCESS"] == 2


def test_xapic_self_ipi_is_taken_right_after_the_icr_write():
    # ICR low (300H): vector 40H, fixed, destination shorthand 01B (self).  The
    # interrupt is recognised at the next instruction boundary (IF=1, TPR 0), so
    # the frame's RIP is the instruction after the store.
    m = run64_xapic("""
        mov rbx, 0xFEE000F0
        mov dword ptr [rbx], 0x1FF
        sti
        mov rbx, 0xFEE00300
        mov dword ptr [rbx], 0x40040
    after:
        nop
        nop
        jmp after
    handler:
        mov rax, [rsp]
        mov [0x300000], rax
    """ + PASS, {"handler": [0x40]})
    assert m.verdict == "pass", m.message
    assert u64s(m, LOG, 1) == [m.syms["after"]]


def test_in_merges_al_and_ax_and_zero_extends_eax():
    # Nothing decodes port 0x80 here: the bus reads all ones.  IN AL and IN AX
    # replace only their bytes of RAX; IN EAX, like every 32-bit destination in
    # 64-bit mode, zero-extends into RAX (SDM Vol. 1 "General-Purpose Registers
    # in 64-Bit Mode").
    m = run64("""
        mov rax, 0x1122334455667788
        in al, 0x80
        mov [0x300000], rax
        mov rax, 0x1122334455667788
        in ax, 0x80
        mov [0x300008], rax
        mov rax, 0x1122334455667788
        in eax, 0x80
        mov [0x300010], rax
    """ + PASS)
    assert m.verdict == "pass", m.message
    assert u64s(m, LOG, 3) == [0x11223344556677FF, 0x112233445566FFFF, 0x00000000FFFFFFFF]
