"""Task switches at run time: far JMP/CALL to a TSS or a task gate and IRET with
NT=1 in 32-bit protected mode, under VMX (a TASK_SWITCH exit) and natively.

Expectations are literals from the Intel SDM:

* Vol. 3C "Treatment of Task Switches": any attempt at a task switch in VMX
  non-root operation is a VM exit (basic reason 9, Appendix C), after the
  checks on the gate (P bit, privilege), the new TSS selector (in the GDT)
  and the new TSS descriptor (type, P, S, limit), which may fault first.
* Vol. 3C table "Exit Qualification for Task Switches": bits 15:0 the
  selector of the new TSS, bits 31:30 the source: 0 CALL, 1 IRET, 2 JMP,
  3 task gate in the IDT.  The VM-exit instruction length is defined for
  CALL, IRET and JMP ("Information for VM Exits Due to Instruction Execution").
* Vol. 2 JMP/CALL/IRET "Operation" and "Protected Mode Exceptions": #GP, #NP,
  #TS with the selector as error code (its bits 1:0 are 0 here); in IA-32e
  mode a far JMP/CALL to a TSS is #GP(selector) and IRET with NT=1 #GP(0).
* VM-exit interruption information: bits 7:0 vector, 10:8 type (3 =
  hardware exception), bit 11 error code valid, bit 31 valid.

The 32-bit guest runs with paging off, which VMX allows only to an
"unrestricted guest" (secondary control bit 7), which needs EPT (bit 1): the
EPT maps the first GiB to itself with one 1-GiB page.
"""
from __future__ import annotations

import struct

from devirt_emu.machine import Machine
from devirt_emu.asm import assemble
from devirt_emu.testing.vmx_case import CODE_BASE, legal_controls, run_case
from legacy_guest import (enter_protected_mode, flat_pm32_fields, gdt_image, idt_image,
                          legacy_machine, run_to_end, with_task_state)

# exit reasons (SDM Appendix C)
EXCEPTION_NMI, TASK_SWITCH = 0, 9
GP, NP, TS = 13, 11, 10
# VM-exit interruption information of a hardware exception with an error code
HW_EXC_EC = (1 << 31) | (3 << 8) | (1 << 11)
# exception bitmap bits of #TS, #NP and #GP
CATCH_TS_NP_GP = (1 << 10) | (1 << 11) | (1 << 13)

# --- guest memory (physical = linear) ---------------------------------------------------
GDT, LDT, EPT = 0x500000, 0x504000, 0x600000
TSS_A, TSS_B, TSS_C, TSS_16 = 0x501000, 0x502000, 0x503000, 0x505000
IDT = 0x506000                             # 256 8-byte gates (protected mode)
STACK = 0x90000


def seg(base: int, limit: int, access: int, flags: int = 0) -> int:
    """An 8-byte segment or system descriptor (SDM "Segment Descriptors")."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
            | (((limit >> 16) & 0xF) << 48) | (flags << 52) | ((base >> 24) << 56))


def task_gate(tss_selector: int, dpl: int = 0, present: bool = True) -> int:
    """A task-gate descriptor: type 5, the TSS selector in bits 31:16."""
    return (tss_selector << 16) | ((5 | dpl << 5 | int(present) << 7) << 40)


CODE32 = seg(0, 0xFFFFF, 0x9A, 0xC)        # flat 32-bit code, DPL 0
DATA32 = seg(0, 0xFFFFF, 0x92, 0xC)
TSS32_BUSY = 0x8B                          # access byte: P, type 11
TSS32_AVAIL = 0x89                         # P, type 9

SEL = {  # selector -> descriptor
    0x08: CODE32,
    0x10: DATA32,
    0x18: seg(TSS_A, 0x67, TSS32_BUSY),    # the current task (TR)
    0x20: seg(TSS_B, 0x67, TSS32_AVAIL),
    0x28: task_gate(0x20),
    0x30: seg(TSS_C, 0x67, TSS32_BUSY),    # a task that called the current one
    0x38: seg(TSS_B, 0x66, TSS32_AVAIL),   # limit below 67H
    0x40: seg(TSS_B, 0x67, 0x09),          # available, not present
    0x48: task_gate(0x30),                 # to a busy TSS
    0x50: task_gate(0x20, present=False),
    0x58: task_gate(0x1000),               # beyond the GDT limit
    0x60: task_gate(0x24),                 # TI = 1: a TSS in the LDT
    0x68: seg(TSS_C, 0x67, 0x0B),          # busy, not present
    0x70: seg(TSS_16, 0x2B, 0x81),         # 16-bit TSS, available, limit 2BH
    0x78: seg(LDT, 0x0F, 0x82),            # the LDT
    0x80: task_gate(0x20, dpl=3),
    0x88: seg(TSS_B, 0x67, TSS32_AVAIL | 0x60),   # DPL 3
}
GDT_LIMIT = 0x8F
LDT_ENTRIES = [task_gate(0x20), seg(TSS_B, 0x67, TSS32_AVAIL)]   # selectors 0x04, 0x0C
IDT_GATES = {  # vector -> gate; every other gate is zero (not present)
    0x40: task_gate(0x20),
    0x41: task_gate(0x20, present=False),
    6: task_gate(0x20),                    # #UD
    13: task_gate(0x30),                   # #GP: to a busy TSS
}


def tss(link: int = 0) -> bytes:
    t = bytearray(0x68)
    struct.pack_into("<H", t, 0, link)
    return bytes(t)


def guest_memory(link: int = 0) -> dict[int, bytes]:
    return {
        GDT: gdt_image(SEL, GDT_LIMIT), LDT: struct.pack("<2Q", *LDT_ENTRIES),
        IDT: idt_image(IDT_GATES),
        TSS_A: tss(link), TSS_B: tss(), TSS_C: tss(), TSS_16: bytes(0x2C),
        EPT: struct.pack("<Q", (EPT + 0x1000) | 7),        # PML4E: RWX -> PDPT
        EPT + 0x1000: struct.pack("<Q", 0x80 | 0x30 | 7),  # 1-GiB page at 0, WB, RWX
    }


def flat_guest_state(rflags: int = 0x2) -> dict[str, int]:
    """VMCS guest state on this file's GDT, IDT, TSS_A (TR = 0x18) and LDT (LDTR
    = 0x78), flat segments at CPL 0, RSP = STACK; no control registers."""
    return {**flat_pm32_fields(gdt=(GDT, GDT_LIMIT), idt=(IDT, 256 * 8 - 1),
                               tr=(0x18, TSS_A, 0x67, TSS32_BUSY), rsp=STACK, rflags=rflags),
            "GUEST_LDTR_SELECTOR": 0x78, "GUEST_LDTR_BASE": LDT, "GUEST_LDTR_LIMIT": 0x0F,
            "GUEST_LDTR_AR_BYTES": 0x82}


def pm32_fields(rflags: int = 0x2, exceptions: int = 0) -> dict[str, int]:
    """VMCS fields of a 32-bit protected-mode guest at CPL 0, paging off, TR = 0x18."""
    f = legal_controls({
        "CPU_BASED_VM_EXEC_CONTROL": 1 << 31,                 # activate secondary controls
        "SECONDARY_VM_EXEC_CONTROL": (1 << 1) | (1 << 7),     # EPT, unrestricted guest
        "VM_ENTRY_CONTROLS": 0,                               # not IA-32e mode
    })
    f.update({
        "EPT_POINTER": EPT | (3 << 3) | 6,                    # 4-level walk, WB
        "EXCEPTION_BITMAP": exceptions,
        "GUEST_CR0": 0x31, "CR0_READ_SHADOW": 0x31,           # PE, ET, NE
        "GUEST_CR4": 1 << 13, "CR4_READ_SHADOW": 0, "GUEST_IA32_EFER": 0,
        **flat_guest_state(rflags),
    })
    return f


def run32(code: str, *, rflags: int = 0x2, link: int = 0, exceptions: int = 0):
    return run_case(".code32\n" + code, vmcs=pm32_fields(rflags, exceptions),
                    memory=guest_memory(link))


def ljmp(sel: int, target: str = "0") -> str:
    """JMP ptr16:32 (EA cp): keystone mis-encodes it in 32-bit code."""
    return f".byte 0xEA\n.long {target}\n.word {sel:#x}\n"


def lcall(sel: int, target: str = "0") -> str:
    """CALL ptr16:32 (9A cp)."""
    return f".byte 0x9A\n.long {target}\n.word {sel:#x}\n"


def assert_task_switch(r, qualification: int, length: int, rip: int):
    assert r.outcome == "exit", str(r)
    e = r.exit
    assert (e.reason, e.exit_reason, e.name) == (TASK_SWITCH, TASK_SWITCH, "TASK_SWITCH"), str(r)
    assert e.qualification == qualification, str(r)
    assert e.instruction_length == length, str(r)
    assert e.guest_rip == rip, str(r)
    # fault-like: nothing of the switch happened
    assert r.vmcs["GUEST_TR_SELECTOR"] == 0x18 and r.vmcs["GUEST_CS_SELECTOR"] == 0x08, str(r)
    return e


def assert_fault(r, vector: int, error_code: int, rip: int):
    assert r.outcome == "exit", str(r)
    e = r.exit
    assert e.reason == EXCEPTION_NMI, str(r)
    assert e.interruption_info == HW_EXC_EC | vector, str(r)
    assert e.error_code == error_code, str(r)
    assert e.guest_rip == rip, str(r)
    assert r.vmcs["GUEST_TR_SELECTOR"] == 0x18, str(r)


# =========================================================================== VM exits
def test_far_jmp_to_tss_exits_with_source_jmp():
    r = run32("nop\nthere:\n" + ljmp(0x20))
    assert_task_switch(r, 0x80000020, 7, r.symbols["there"])    # 2 << 30 | 0x20; EA cp is 7 bytes
    assert r.steps == 1                      # the NOP retired, the JMP did not


def test_far_call_to_tss_exits_with_source_call():
    r = run32(lcall(0x20))
    assert_task_switch(r, 0x00000020, 7, CODE_BASE)


def test_far_jmp_through_task_gate_reports_the_tss_selector():
    r = run32(ljmp(0x28))
    assert_task_switch(r, 0x80000020, 7, CODE_BASE)          # the gate's TSS, not the gate


def test_far_call_through_task_gate():
    r = run32(lcall(0x28))
    assert_task_switch(r, 0x00000020, 7, CODE_BASE)


def test_far_jmp_and_call_through_memory_operand():
    # FF /5 and FF /3 with m16:32: offset dword, then the selector word
    setup = f"mov dword ptr [{STACK - 8:#x}], 0\nmov word ptr [{STACK - 4:#x}], 0x28\n" \
            f"mov eax, {STACK - 8:#x}\n"
    r = run32(setup + "there: ljmp [eax]")                   # FF 28: 2 bytes
    assert_task_switch(r, 0x80000020, 2, r.symbols["there"])
    r = run32(setup + "there: lcall [eax]")                  # FF 18
    assert_task_switch(r, 0x00000020, 2, r.symbols["there"])
    # 66 FF 18: CALL m16:16 [eax]: offset word, then the selector word (at STACK - 6)
    r = run32(setup + f"mov word ptr [{STACK - 6:#x}], 0x20\nthere: .byte 0x66, 0xFF, 0x18")
    assert_task_switch(r, 0x00000020, 3, r.symbols["there"])


def test_far_pointer_beyond_its_segment_limit_is_gp0_or_ss0():
    # DS and SS with a byte-granular limit of FFFFFH (AR: G = 0).  The 6-byte far pointer
    # at FFFFAH ends at the limit: the task switch exits; at FFFFBH its last byte is
    # beyond it: #GP(0) through DS, #SS(0) through SS, before any task switch.
    fields = pm32_fields(exceptions=CATCH_TS_NP_GP | (1 << 12))
    for s in ("DS", "SS"):
        fields[f"GUEST_{s}_LIMIT"], fields[f"GUEST_{s}_AR_BYTES"] = 0xFFFFF, 0x4093

    def code(at: int, far: str) -> str:
        return (f".code32\nmov dword ptr es:[{at:#x}], 0\nmov word ptr es:[{at + 4:#x}], 0x20\n"
                f"mov eax, {at:#x}\nthere: {far}")
    r = run_case(code(0xFFFFA, "ljmp [eax]"), vmcs=fields, memory=guest_memory())
    assert_task_switch(r, 0x80000020, 2, r.symbols["there"])
    r = run_case(code(0xFFFFB, "ljmp [eax]"), vmcs=fields, memory=guest_memory())
    assert_fault(r, GP, 0, r.symbols["there"])
    r = run_case(code(0xFFFFB, "ljmp ss:[eax]"), vmcs=fields, memory=guest_memory())
    assert r.exit.reason == EXCEPTION_NMI and r.exit.interruption_info == HW_EXC_EC | 12, str(r)
    assert r.exit.error_code == 0 and r.exit.guest_rip == r.symbols["there"], str(r)


def test_far_jmp_16bit_operand_size():
    # 66 EA: JMP ptr16:16 (offset word, selector word): 6 bytes
    r = run32("there: .byte 0x66, 0xEA, 0x00, 0x00, 0x20, 0x00")
    assert_task_switch(r, 0x80000020, 6, CODE_BASE)


def test_far_jmp_to_16bit_tss():
    r = run32(ljmp(0x70))
    assert_task_switch(r, 0x80000070, 7, CODE_BASE)


def test_task_gate_in_the_ldt():
    r = run32(ljmp(0x04))                    # LDT entry 0, TI = 1
    assert_task_switch(r, 0x80000020, 7, CODE_BASE)


def test_task_gate_privilege_is_checked_on_the_gate_only():
    # gate DPL 3 >= RPL 3 and >= CPL 0: the TSS's DPL 0 is not checked (SDM "Treatment
    # of Task Switches" item 1.b)
    r = run32(ljmp(0x83))
    assert_task_switch(r, 0x80000020, 7, CODE_BASE)


def test_iret_with_nt_is_a_task_return():
    r = run32("nop\nthere: iretd", rflags=0x4002, link=0x30)
    assert_task_switch(r, 0x40000030, 1, r.symbols["there"])   # 1 << 30 | back link


def test_instructions_before_the_task_switch_retire():
    # instructions before the task switch retire; the exit reports the guest state then
    r = run32("mov eax, 0x1234\nmov ecx, 5\nthere:\n" + ljmp(0x20))
    e = assert_task_switch(r, 0x80000020, 7, r.symbols["there"])
    assert r.steps == 2
    assert e.regs["rax"] == 0x1234 and e.regs["rcx"] == 5


# =========================================================================== no exit
def test_ordinary_far_jmp_and_call_do_not_exit():
    r = run32(ljmp(0x08, "t") + "nop\nt: nop")
    assert r.outcome == "no_exit" and r.no_exit.why == "halted", str(r)
    assert r.steps == 3                      # JMP, the NOP at t, the HLT after the code
    r = run32(lcall(0x08, "t") + "nop\nt: nop")
    assert r.outcome == "no_exit" and r.no_exit.why == "halted", str(r)
    assert r.steps == 3
    assert r.no_exit.regs["rsp"] == STACK - 8    # CALL far pushed CS and EIP (2 dwords)


def test_iret_without_nt_does_not_exit():
    r = run32("pushfd\npush 0x08\nmov eax, t\npush eax\niretd\nnop\nt: nop", link=0x30)
    assert r.outcome == "no_exit" and r.no_exit.why == "halted", str(r)
    assert r.steps == 7                      # 5 to the IRET, the NOP at t, the HLT
    assert r.no_exit.regs["rsp"] == STACK


# =========================================================================== faults first
# (the exception bitmap catches #TS, #NP and #GP, so each fault is an exit with its error code)
def fault32(code: str, **kw):
    return run32(code, exceptions=CATCH_TS_NP_GP, **kw)


def test_jmp_to_busy_tss_is_gp():
    assert_fault(fault32(ljmp(0x30)), GP, 0x30, CODE_BASE)
    assert_fault(fault32(lcall(0x18)), GP, 0x18, CODE_BASE)     # the current task


def test_jmp_to_tss_with_rpl_above_dpl_is_gp():
    assert_fault(fault32(ljmp(0x23)), GP, 0x20, CODE_BASE)      # RPL 3 > DPL 0


def test_jmp_to_tss_not_present_is_np():
    assert_fault(fault32(ljmp(0x40)), NP, 0x40, CODE_BASE)


def test_jmp_to_tss_with_short_limit_is_ts():
    assert_fault(fault32(ljmp(0x38)), TS, 0x38, CODE_BASE)


def test_tss_in_the_ldt_is_gp():
    assert_fault(fault32(ljmp(0x0C)), GP, 0x0C, CODE_BASE)


def test_task_gate_checks():
    assert_fault(fault32(ljmp(0x2B)), GP, 0x28, CODE_BASE)      # gate DPL 0 < RPL 3
    assert_fault(fault32(ljmp(0x50)), NP, 0x50, CODE_BASE)      # gate not present
    assert_fault(fault32(lcall(0x48)), GP, 0x30, CODE_BASE)     # its TSS is busy
    assert_fault(fault32(ljmp(0x58)), GP, 0x1000, CODE_BASE)    # its TSS beyond the GDT
    assert_fault(fault32(ljmp(0x60)), GP, 0x24, CODE_BASE)      # its TSS selector has TI = 1


def test_task_return_checks():
    assert_fault(fault32("iretd", rflags=0x4002, link=0x20), TS, 0x20, CODE_BASE)  # not busy
    assert_fault(fault32("iretd", rflags=0x4002, link=0), TS, 0, CODE_BASE)        # null link
    assert_fault(fault32("iretd", rflags=0x4002, link=0x30 | 4), TS, 0x34, CODE_BASE)  # TI = 1
    assert_fault(fault32("iretd", rflags=0x4002, link=0x68), NP, 0x68, CODE_BASE)  # not present


def test_fault_before_task_switch_without_exception_exiting_is_not_an_exit():
    # #GP(0x30) is not intercepted: it is delivered through the guest's IDT, whose gate 13
    # is a task gate to the busy TSS 0x30: #GP(0x31) during #GP is #DF, whose gate is not
    # present: a triple fault.  No TASK_SWITCH exit happened.
    r = run32(ljmp(0x30))
    assert r.outcome == "exit" and r.exit.name == "TRIPLE_FAULT", str(r)
    assert r.vmcs["GUEST_TR_SELECTOR"] == 0x18


# =========================================================================== IDT task gates
# IDT-vectoring information: bits 7:0 vector, 10:8 type (3 hardware exception,
# 4 software interrupt), bit 11 error code valid, bit 31 valid.
def test_int_n_through_task_gate_exits_with_source_idt():
    r = run32("nop\nthere: int 0x40")
    e = assert_task_switch(r, 0xC0000020, 2, r.symbols["there"])   # 3 << 30 | TSS; CD ib
    assert e.idt_vectoring_info == 0x80000440                      # software interrupt 0x40
    assert r.steps == 1                                            # the INT did not retire


def test_exception_through_task_gate_exits_with_vectoring_info():
    r = run32("there: ud2")
    e = assert_task_switch(r, 0xC0000020, None, r.symbols["there"])
    assert e.idt_vectoring_info == 0x80000306                      # hardware exception 6
    assert e.instruction_length is None                            # not a software event


def test_task_gate_faults_during_delivery():
    # INT 0x41: gate not present: #NP(0x41 * 8 + 2), EXT = 0 for INT n
    r = fault32("there: int 0x41")
    assert r.exit.reason == EXCEPTION_NMI, str(r)
    assert r.exit.interruption_info == HW_EXC_EC | NP and r.exit.error_code == 0x20A, str(r)
    assert r.exit.idt_vectoring_info == 0x80000441, str(r)
    # #GP(0x30) from a JMP to a busy TSS goes through IDT gate 13, whose TSS (0x30) is
    # busy: #GP(0x30 | EXT), a contributory fault during a contributory one: #DF(0)
    r = run32(ljmp(0x30), exceptions=1 << 8)
    assert r.exit.reason == EXCEPTION_NMI, str(r)
    assert r.exit.interruption_info == HW_EXC_EC | 8 and r.exit.error_code == 0, str(r)
    # the same with #GP intercepted: the first #GP exits
    r = run32(ljmp(0x30), exceptions=1 << GP)
    assert r.exit.error_code == 0x30 and r.exit.idt_vectoring_info == 0, str(r)


def test_ud_through_busy_tss_gate_gp_has_ext():
    # #UD through gate 6 to TSS 0x20 is fine (exit); point it at the busy TSS instead
    mem = guest_memory()
    mem[IDT] = mem[IDT][:6 * 8] + struct.pack("<Q", task_gate(0x30)) + mem[IDT][7 * 8:]
    r = run_case(".code32\nthere: ud2", vmcs=pm32_fields(exceptions=1 << GP), memory=mem)
    assert r.exit.reason == EXCEPTION_NMI, str(r)
    assert r.exit.interruption_info == HW_EXC_EC | GP and r.exit.error_code == 0x31, str(r)
    assert r.exit.idt_vectoring_info == 0x80000306, str(r)


# =========================================================================== IA-32e mode
def test_far_jmp_to_tss_in_64bit_mode_is_gp_not_an_exit():
    # the fresh 64-bit state's GDT has its (busy) 64-bit TSS at 0x18
    setup = "mov qword ptr [rsp-16], 0\nmov word ptr [rsp-12], 0x18\n"
    for far in ("0xFF, 0x6C, 0x24, 0xF0", "0xFF, 0x5C, 0x24, 0xF0"):   # jmp/call far [rsp-16]
        r = run_case(setup + f"there: .byte {far}", vmcs={"EXCEPTION_BITMAP": 1 << GP})
        assert r.outcome == "exit" and r.exit.reason == EXCEPTION_NMI, str(r)
        assert r.exit.interruption_info == HW_EXC_EC | GP and r.exit.error_code == 0x18, str(r)
        assert r.exit.guest_rip == r.symbols["there"]


def test_iretq_with_nt_in_64bit_mode_is_gp0():
    r = run_case("pushfq\nor qword ptr [rsp], 0x4000\npopfq\nthere: iretq",
                 vmcs={"EXCEPTION_BITMAP": 1 << GP})
    assert r.outcome == "exit" and r.exit.reason == EXCEPTION_NMI, str(r)
    assert r.exit.interruption_info == HW_EXC_EC | GP and r.exit.error_code == 0, str(r)
    assert r.exit.guest_rip == r.symbols["there"]


# =========================================================================== natively
NATIVE_CODE = 0x100000
REPORT = "mov al, 0\nout 0xf4, al\n"


def run_native(source: str, link: int = 0, *, under_l0: bool = False) -> Machine:
    """A 32-bit protected-mode program on a machine without VMX (paging off, CPL 0,
    TR = 0x18); task B (TSS_B) starts at label ``task_b`` with ESP = STACK - 0x1000.
    ``under_l0``: the same under the stock L0 (``--arch vmx --config stock``)."""
    code, syms = assemble(".code32\n" + source, NATIVE_CODE, "native.S")
    m = legacy_machine(under_l0=under_l0, max_ns=1_000_000)
    for pa, blob in guest_memory(link).items():
        if pa < EPT:
            m.write_phys(pa, blob)
    m.write_phys(TSS_B, with_task_state(tss(), eip=syms["task_b"], esp=STACK - 0x1000))
    m.write_phys(NATIVE_CODE, code)
    enter_protected_mode(m.cores[0], gdt=(GDT, GDT_LIMIT), idt=(IDT, 256 * 8 - 1), cr0=0x31,
                         cs=0x08, data=0x10, tr=(0x18, TSS_A, 0x67, TSS32_BUSY), esp=STACK,
                         eip=NATIVE_CODE)
    m.syms = syms
    return run_to_end(m, under_l0=under_l0)


def test_native_far_jmp_switches_tasks():
    m = run_native("mov eax, 7\njmp_here:\n" + ljmp(0x20) + "ud2\ntask_b:\n" + REPORT)
    assert m.verdict == "pass", m.message
    core = m.cores[0]
    assert core.read_segment(7)[0] == 0x20                     # TR
    saved_eip, = struct.unpack("<I", m.mem.read(TSS_A + 0x20, 4))
    saved_eax, = struct.unpack("<I", m.mem.read(TSS_A + 0x28, 4))
    assert saved_eip == m.syms["jmp_here"] + 7 and saved_eax == 7
    gdt = m.mem.read(GDT, GDT_LIMIT + 1)
    assert (gdt[0x18 + 5] & 0xF, gdt[0x20 + 5] & 0xF) == (9, 11)  # JMP: old free, new busy
    assert core.events.get("TASK_SWITCH") == 1
    assert "JMP_FAR" not in core.events


def test_native_call_and_iret_switch_and_return():
    m = run_native(lcall(0x28) + REPORT + "task_b:\n"
                   "pushfd\npop eax\nmov [0x400000], eax\niretd\n")
    assert m.verdict == "pass", m.message
    assert m.cores[0].read_segment(7)[0] == 0x18               # back in task A
    nested_flags, = struct.unpack("<I", m.mem.read(0x400000, 4))
    assert nested_flags & 0x4000                               # CALL set NT in task B
    link, = struct.unpack("<H", m.mem.read(TSS_B, 2))
    assert link == 0x18                                        # B's back link: A
    assert m.cores[0].events.get("TASK_SWITCH") == 2           # the CALL and the IRET


def test_native_task_gate_in_idt_switches_tasks():
    # INT 0x40 through the task gate to TSS 0x20 (SDM "Task Switching", with nesting): the
    # new task's link is the old TSS, NT is set in it, the old task resumes after the INT
    m = run_native("int 0x40\nback:\nud2\ntask_b:\n" "pushfd\npop eax\nmov [0x400000], eax\n"
                   + REPORT)
    assert m.verdict == "pass", m.message
    assert m.cores[0].read_segment(7)[0] == 0x20
    link, = struct.unpack("<H", m.mem.read(TSS_B, 2))
    saved_eip, = struct.unpack("<I", m.mem.read(TSS_A + 0x20, 4))
    flags_b, = struct.unpack("<I", m.mem.read(0x400000, 4))
    assert (link, saved_eip) == (0x18, m.syms["back"]) and flags_b & 0x4000
    assert m.cores[0].events.get("TASK_SWITCH") == 1


def test_native_ordinary_far_jmp_is_not_an_event():
    m = run_native(ljmp(0x08, "t") + "ud2\nt:\n" + REPORT + "task_b:\n")
    assert m.verdict == "pass", m.message
    assert "TASK_SWITCH" not in m.cores[0].events and "JMP_FAR" not in m.cores[0].events


def test_int_n_fault_in_64bit_mode_records_the_int_as_idt_vectoring_info():
    # every gate of the fresh 64-bit IDT is zero: delivering INT 0x40 is #GP(0x40 * 8 + 2),
    # EXT = 0; the exit on that #GP reports the software interrupt being delivered
    r = run_case("there: int 0x40", vmcs={"EXCEPTION_BITMAP": 1 << GP})
    assert r.exit.reason == EXCEPTION_NMI, str(r)
    assert r.exit.interruption_info == HW_EXC_EC | GP and r.exit.error_code == 0x202, str(r)
    assert r.exit.idt_vectoring_info == 0x80000440 and r.exit.guest_rip == r.symbols["there"]


# =========================================================================== the checks alone
from devirt_emu.platform import tasks  # noqa: E402


def _gdt(entries: dict[int, int]):
    return lambda sel: entries.get(sel & ~7, 0) if sel & ~7 <= 0x40 else None


def _fault(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except tasks.TaskFault as f:
        return f.vector, f.error_code
    return None


def test_tss_limits_32_and_16_bit():
    # 32-bit TSS: limit 67H is valid, 66H is #TS; 16-bit TSS (type 1): 2BH valid, 2AH #TS
    for access, good, bad in ((0x89, 0x67, 0x66), (0x81, 0x2B, 0x2A)):
        assert tasks.far_transfer_tss(0x20, seg(0, good, access), 0, _gdt({})) == 0x20
        assert _fault(tasks.far_transfer_tss, 0x20, seg(0, bad, access), 0, _gdt({})) == (TS, 0x20)
    # a page-granular limit (G = 1): 0 pages means limit FFFH
    assert tasks.far_transfer_tss(0x20, seg(0, 0, 0x89, 0x8), 0, _gdt({})) == 0x20


def test_privilege_checks_at_cpl3():
    tss3 = seg(0, 0x67, 0x89 | 0x60)                      # DPL 3
    assert tasks.far_transfer_tss(0x23, tss3, 3, _gdt({})) == 0x23
    assert _fault(tasks.far_transfer_tss, 0x20, seg(0, 0x67, 0x89), 3, _gdt({})) == (GP, 0x20)
    gdt = {0x20: seg(0, 0x67, 0x89)}
    assert tasks.far_transfer_tss(0x2B, task_gate(0x20, dpl=3), 3, _gdt(gdt)) == 0x20
    assert _fault(tasks.far_transfer_tss, 0x28, task_gate(0x20, dpl=2), 3, _gdt(gdt)) == (GP, 0x28)


def test_idt_task_gate_checks():
    gdt = {0x20: seg(0, 0x67, 0x89), 0x30: seg(0, 0x67, 0x8B)}
    gate0 = task_gate(0x20)                               # DPL 0
    # INT n at CPL 3 through a DPL-0 gate: #GP(vector * 8 + 2); a hardware event is not checked
    assert _fault(tasks.idt_task_gate_tss, 0x40, gate0, 3, _gdt(gdt), soft=True) == (GP, 0x202)
    assert tasks.idt_task_gate_tss(0x40, gate0, 3, _gdt(gdt), soft=False) == 0x20
    # not present: #NP(vector * 8 + 2 + EXT)
    gate_np = task_gate(0x20, present=False)
    assert _fault(tasks.idt_task_gate_tss, 0x21, gate_np, 0, _gdt(gdt), soft=False) == (NP, 0x10B)
    # busy TSS: #GP(TSS selector + EXT)
    assert _fault(tasks.idt_task_gate_tss, 8, task_gate(0x30), 0, _gdt(gdt), soft=False) == (GP, 0x31)


# =========================================================================== under the L0
def test_l0_emulates_a_far_jmp_task_switch():
    # KVM handles a TASK_SWITCH exit by performing the switch and resuming the guest
    m = run_native("mov eax, 7\njmp_here:\n" + ljmp(0x20) + "ud2\ntask_b:\n" + REPORT,
                   under_l0=True)
    assert m.verdict == "pass", m.message
    assert m.exit_counts.get("TASK_SWITCH") == 1
    assert m.cores[0].read_segment(7)[0] == 0x20                # TR: the new task
    saved_eax, = struct.unpack("<I", m.mem.read(TSS_A + 0x28, 4))
    assert saved_eax == 7                                      # the old task's state was saved


def test_l0_emulates_call_and_iret_task_switches():
    m = run_native(lcall(0x28) + REPORT + "task_b:\n" "iretd\n", under_l0=True)
    assert m.verdict == "pass", m.message
    assert m.exit_counts.get("TASK_SWITCH") == 2               # the CALL and the IRET
    assert m.cores[0].read_segment(7)[0] == 0x18               # back in task A


def test_l0_emulates_a_task_gate_in_the_idt():
    # KVM's handle_task_switch: source 3 (IDT), the INT n (a software interrupt in the
    # IDT-vectoring information) skipped; the platform performs the switch
    m = run_native("int 0x40\nback:\nud2\ntask_b:\n" + REPORT, under_l0=True)
    assert m.verdict == "pass", m.message
    assert m.exit_counts.get("TASK_SWITCH") == 1
    assert m.cores[0].read_segment(7)[0] == 0x20
    link, = struct.unpack("<H", m.mem.read(TSS_B, 2))
    saved_eip, = struct.unpack("<I", m.mem.read(TSS_A + 0x20, 4))
    assert (link, saved_eip) == (0x18, m.syms["back"])
