"""Interrupt and exception delivery outside IA-32e mode, natively, on firmware-free guests.

Expectations are literals from the Intel SDM:

* Vol. 2 "INT n/INTO/INT3/INT1 -- Call to Interrupt Procedure", Operation:
  REAL-ADDRESS-MODE: the IVT entry at IDTR.base + 4 * vector holds IP (low
  word) and CS; beyond IDTR.limit it is #GP; FLAGS, CS, IP are pushed (6
  bytes; no room: #SS), then IF, TF and AC are cleared; no error code is
  pushed in real-address mode.  PROTECTED-MODE: beyond the IDT limit or not
  a task, interrupt or trap gate: #GP(vector * 8 + 2 + EXT); an INT n, INT3
  or INTO whose gate DPL < CPL: #GP(vector * 8 + 2); gate not present:
  #NP(vector * 8 + 2 + EXT); a null code-segment selector #GP(EXT), one that
  does not name a code segment or names one with DPL > CPL #GP(selector +
  EXT), not present #NP(selector + EXT).  INTER-PRIVILEGE-LEVEL-INTERRUPT:
  the new stack from the TSS (SS for the new CPL: null #TS(EXT), RPL or DPL
  not the new CPL or not a writable data segment #TS(SS + EXT), not present
  #SS(SS + EXT)); SS and ESP of the old stack, EFLAGS, CS, EIP and the error
  code are pushed, 4 bytes each through a 32-bit gate, 2 through a 16-bit
  one.  INTERRUPT-FROM-VIRTUAL-8086-MODE: GS, FS, DS, ES pushed first, then
  loaded null.  Then TF, NT, VM and RF are cleared, and IF through an
  interrupt gate (not a trap gate).
* Vol. 3A "Error Code": bit 0 EXT is set unless the event is INT n, INT3 or
  INTO; bit 1 IDT; bits 15:3 the selector index.
* Vol. 3A "Interrupt 8 -- Double Fault": a contributory exception (#DE, #TS,
  #NP, #SS, #GP) while delivering a contributory one is #DF (error code 0);
  an exception while delivering #DF shuts the processor down.
* Vol. 2 INT n, "Virtual-8086 Mode Exceptions": INT n with IOPL < 3 is #GP(0).
* Vol. 3A "Task Switching": through an IDT task gate the switch nests (the
  new task's previous-task link is the old TSS selector, EFLAGS.NT is set in
  the new task, both TSS descriptors busy); the old task's EIP, EFLAGS and
  registers are saved in its TSS; an exception's error code is pushed onto
  the new task's stack.

Every guest runs with paging off (physical = linear).  The handlers end the
run with an OUT to the test-exit port, so the core's state at the end is the
handler's, and the frame is on its stack.
"""
from __future__ import annotations

import struct

import pytest
from unicorn import x86_const as X

from devirt_emu.asm import assemble
from devirt_emu.machine import Machine
from devirt_emu.platform.core import State
from legacy_guest import (LDTR, enter_protected_mode, flat_pm32_fields, gdt_image, idt_image,
                          legacy_machine, run_to_end, with_task_state)

GP, NP, SS, TS, DF, UD, DE = 13, 11, 12, 10, 8, 6, 0
IF, TF, NT, VM, AC, OF = 1 << 9, 1 << 8, 1 << 14, 1 << 17, 1 << 18, 1 << 11
IOPL3 = 3 << 12
EXIT = "mov al, 0\nout 0xf4, al\n"          # the handler's end: OUT does not touch EFLAGS


def seg(base: int, limit: int, access: int, flags: int = 0) -> int:
    """An 8-byte segment or system descriptor (SDM "Segment Descriptors")."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
            | (((limit >> 16) & 0xF) << 48) | (flags << 52) | ((base >> 24) << 56))


def gate(gtype: int, selector: int, offset: int = 0, dpl: int = 0, present: bool = True) -> int:
    """An 8-byte IDT gate: type 5 task, 6/7 16-bit interrupt/trap, 14/15 32-bit."""
    return ((offset & 0xFFFF) | (selector << 16) | ((gtype | dpl << 5 | int(present) << 7) << 40)
            | ((offset >> 16) << 48))


INTR32, TRAP32, INTR16, TRAP16, TASK = 0xE, 0xF, 0x6, 0x7, 0x5

# ---------------------------------------------------------------- protected-mode layout
GDT, IDT, TSS_A, TSS_B, TSS_16 = 0x20000, 0x21000, 0x22000, 0x23000, 0x24000
CODE, V86_CODE, RESULT = 0x30000, 0x31000, 0x60000
STACK0, STACK3, STACK_B = 0x80000, 0x70000, 0x78000
GDT_ENTRIES = {
    0x08: seg(0, 0xFFFFF, 0x9A, 0xC),          # flat 32-bit code, DPL 0
    0x10: seg(0, 0xFFFFF, 0x92, 0xC),          # flat data, DPL 0
    0x18: seg(TSS_A, 0x67, 0x8B),              # the current task: 32-bit TSS, busy
    0x20: seg(CODE, 0xFFFF, 0x9A),             # 16-bit code at CODE, DPL 0
    0x28: seg(0, 0xFFFFF, 0xFA, 0xC),          # flat 32-bit code, DPL 3
    0x30: seg(0, 0xFFFFF, 0xF2, 0xC),          # flat data, DPL 3
    0x38: seg(0, 0xFFFFF, 0x9E, 0xC),          # conforming code, DPL 0
    0x40: seg(0, 0xFFFFF, 0x12, 0xC),          # data, not present
    0x48: seg(0, 0xFFFFF, 0x1A, 0xC),          # code, not present
    0x50: seg(TSS_B, 0x67, 0x89),              # task B: 32-bit TSS, available
    0x58: seg(0, 0xFFFFF, 0x90, 0xC),          # read-only data, DPL 0
    0x60: seg(0, 0xFFFFF, 0xB2, 0xC),          # data, DPL 1
    0x68: seg(0, 0xF, 0x92),                   # 16-bit data of limit FH (a 16-bit stack: B = 0)
    0x70: seg(0, 0xFFFF, 0x92),                # 16-bit data of limit FFFFH (B = 0)
    0x78: seg(TSS_16, 0x2B, 0x81),             # a 16-bit TSS, available
}
GDT_LIMIT = 0xFF


def _tss32(esp0: int = STACK0, ss0: int = 0x10) -> bytearray:
    t = bytearray(0x68)
    struct.pack_into("<IH", t, 4, esp0, ss0)
    return t


def run_pm(code: str, *, idt: dict[int, int], cpl: int = 0, eflags: int = 0x2,
           esp: int | None = None, gdt: dict[int, int] | None = None, tss_a: bytes | None = None,
           tss_b: dict | None = None, v86: str | None = None, idt_limit: int = 256 * 8 - 1,
           tr_limit: int = 0x67, tss16: bytes | None = None, tr16: bool = False,
           under_l0: bool = False) -> Machine:
    """Run 32-bit protected-mode ``code`` at CODE (CS = 0x08, or 0x2B at ``cpl`` 3)
    with TR = 0x18 (TSS_A: ESP0 = STACK0, SS0 = 0x10 unless ``tss_a``), the IDT
    ``idt`` (vector -> gate), to the end of the run.  ``tss_b``: the initial
    state of task B (keys "eip", "esp", "eflags"; CS 0x08, data 0x10).  ``v86``:
    16-bit code placed at V86_CODE."""
    syms_src = ".code32\n" + code
    blob, syms = assemble(syms_src, CODE, "pm.S")
    m = legacy_machine(under_l0=under_l0, max_ns=200_000)
    m.write_phys(GDT, gdt_image({**GDT_ENTRIES, **(gdt or {})}, GDT_LIMIT))
    m.write_phys(IDT, idt_image(idt))
    m.write_phys(TSS_A, bytes(tss_a if tss_a is not None else _tss32()))
    m.write_phys(TSS_B, bytes(0x68) if tss_b is None else
                 with_task_state(bytes(0x68), eip=tss_b["eip"], eflags=tss_b.get("eflags", 0x2),
                                 esp=tss_b.get("esp", STACK_B)))
    if tss16 is not None:
        m.write_phys(TSS_16, tss16)
    m.write_phys(CODE, blob)
    if v86 is not None:
        m.write_phys(V86_CODE, assemble(".code16\n" + v86, 0, "v86.S")[0])
    core = m.cores[0]
    enter_protected_mode(
        core, gdt=(GDT, GDT_LIMIT), idt=(IDT, idt_limit), cr0=0x31,
        cs=0x2B if cpl == 3 else 0x08, data=0x33 if cpl == 3 else 0x10,
        # the current task's TSS: the 16-bit one (busy) with ``tr16``
        tr=(0x78, TSS_16, 0x2B, 0x83) if tr16 else (0x18, TSS_A, tr_limit, 0x8B),
        esp=esp if esp is not None else (STACK3 if cpl == 3 else STACK0), eflags=eflags, eip=CODE)
    core.write_segment(LDTR, 0, 0, 0, 1 << 16)                       # unusable
    m.syms = syms
    return run_to_end(m, under_l0=under_l0)


def dwords(m: Machine, linear: int, n: int) -> list[int]:
    return list(struct.unpack(f"<{n}I", m.mem.read(linear, 4 * n)))


def words(m: Machine, linear: int, n: int) -> list[int]:
    return list(struct.unpack(f"<{n}H", m.mem.read(linear, 2 * n)))


def state(m: Machine) -> dict[str, int]:
    core = m.cores[0]
    p = core.probe
    return {"cs": p.segment(1)[0], "ss": p.segment(2)[0], "ds": p.segment(3)[0],
            "es": p.segment(0)[0], "fs": p.segment(4)[0], "gs": p.segment(5)[0],
            "esp": p.gpr(4) & 0xFFFFFFFF, "eflags": p.reg(X.UC_X86_REG_EFLAGS),
            "eip": p.eip(), "cpl": core.cpl(), "tr": p.segment(7)[0]}


def passed(m: Machine) -> dict[str, int]:
    assert m.verdict == "pass", (m.verdict, m.message)
    return state(m)


# =========================================================================== real-address mode
RM_CS, RM_SS, RM_SP = 0x1000, 0x2000, 0x1000       # code at 0x10000, stack top at 0x21000


def run_real(code: str, ivt: dict[int, str], *, sp: int = RM_SP, flags: int = 0x2,
             idt_limit: int = 0x3FF) -> Machine:
    """Real-mode ``code`` at RM_CS:0, IVT at 0 with ``ivt`` (vector -> label in code)."""
    blob, syms = assemble(".code16\n" + code, 0, "rm.S")
    m = legacy_machine(under_l0=False, max_ns=200_000)
    m.write_phys(RM_CS << 4, blob)
    for vec, label in ivt.items():
        m.write_phys(vec * 4, struct.pack("<HH", syms[label], RM_CS))
    core = m.cores[0]
    uc = core.uc
    uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, idt_limit, 0))
    core.write_segment(1, RM_CS, RM_CS << 4, 0xFFFF, 0x9B)
    core.write_segment(2, RM_SS, RM_SS << 4, 0xFFFF, 0x93)
    uc.reg_write(X.UC_X86_REG_ESP, sp)
    uc.reg_write(X.UC_X86_REG_EFLAGS, flags)
    uc.reg_write(X.UC_X86_REG_RIP, 0)
    core.state = State.RUNNING
    m.syms = syms
    return run_to_end(m, under_l0=False)


def rm_stack(m: Machine, sp: int, n: int) -> list[int]:
    return words(m, (RM_SS << 4) + sp, n)


def test_real_mode_int_n_pushes_flags_cs_ip_and_clears_if_tf():
    m = run_real("sti\nthere: int 0x40\n" + EXIT + "handler:\n" + EXIT,
                 {0x40: "handler"}, flags=0x2 | TF * 0 | AC)
    s = passed(m)
    assert (s["cs"], s["eip"]) == (RM_CS, m.syms["handler"] + 4)      # at the handler's OUT
    assert s["esp"] == RM_SP - 6
    ip, cs, flags = rm_stack(m, RM_SP - 6, 3)
    assert (ip, cs) == (m.syms["there"] + 2, RM_CS)                   # INT n: the next instruction
    assert flags == 0x2 | IF                                          # FLAGS as before the INT
    assert not s["eflags"] & (IF | TF | AC)


def test_real_mode_iret_returns_and_restores_flags():
    # measured: Unicorn 2.1.4 executes the real-mode IRET itself (pops IP, CS, FLAGS)
    m = run_real("sti\nint 0x40\nafter:\n" + EXIT + "handler: iret\n", {0x40: "handler"})
    s = passed(m)
    assert s["eip"] == m.syms["after"] + 4 and s["esp"] == RM_SP
    assert s["eflags"] & IF


def test_real_mode_fault_pushes_the_faulting_ip_and_no_error_code():
    # #DE: a fault, IP of the DIV; #GP, which has an error code in protected mode, has none here
    m = run_real("xor bl, bl\nthere: div bl\nhlt\nhandler:\n" + EXIT, {DE: "handler"})
    s = passed(m)
    assert s["esp"] == RM_SP - 6
    assert rm_stack(m, RM_SP - 6, 2) == [m.syms["there"], RM_CS]


def test_real_mode_vector_beyond_the_idt_limit_is_gp_without_error_code():
    # limit 0x3F: vectors 0-15; INT 0x40 is #GP (vector 13 at 0x34-0x37 is within)
    m = run_real("there: int 0x40\nhlt\nhandler:\n" + EXIT, {GP: "handler"}, idt_limit=0x3F)
    s = passed(m)
    assert s["esp"] == RM_SP - 6                                      # FLAGS, CS, IP only
    assert rm_stack(m, RM_SP - 6, 2) == [m.syms["there"], RM_CS]      # the INT did not happen


def test_real_mode_gp_during_delivery_of_gp_is_double_fault():
    # limit 0x23: vectors 0-8.  INT 0x40 -> #GP, whose entry (0x34) is beyond too -> #DF
    m = run_real("there: int 0x40\nhlt\ndf:\n" + EXIT, {DF: "df"}, idt_limit=0x23)
    s = passed(m)
    assert s["esp"] == RM_SP - 6
    assert rm_stack(m, RM_SP - 6, 2) == [m.syms["there"], RM_CS]


def test_real_mode_fault_delivering_double_fault_shuts_down():
    m = run_real("int 0x40\nhlt\n", {}, idt_limit=0x1F)             # vectors 0-7 only
    assert m.verdict == "shutdown", (m.verdict, m.message)
    assert m.cores[0].state is State.SHUTDOWN


@pytest.mark.parametrize("sp, ok", [(1, False), (5, False), (4, True), (0, True)])
def test_real_mode_stack_room(sp, ok):
    # each 2-byte push must lie within SS (limit FFFFH): from SP = 1 the first one is at
    # FFFFH-10000H, from SP = 5 the third (#SS, and every later delivery fails the same
    # way: shutdown); from SP = 4 or 0 the 16-bit SP wraps between pushes and they fit
    m = run_real("int 0x40\nhlt\nhandler:\n" + EXIT, {0x40: "handler"}, sp=sp)
    if not ok:
        assert m.verdict == "shutdown", (m.verdict, m.message)
        return
    s = passed(m)
    assert s["esp"] == (sp - 6) & 0xFFFF


# =========================================================================== protected mode
def pm_handler_idt(syms, entries) -> dict[int, int]:
    return {vec: gate(t, sel, syms[label] if isinstance(label, str) else label, dpl)
            for vec, (t, sel, label, dpl) in entries.items()}


def run_pm_labels(code: str, entries: dict, **kw) -> Machine:
    """run_pm with IDT gates given as (type, selector, label, DPL): the code is
    assembled once to learn the labels."""
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    return run_pm(code, idt=pm_handler_idt(syms, entries), **kw)


def test_int_n_through_32bit_interrupt_gate_same_privilege():
    m = run_pm_labels("sti\nthere: int 0x40\nhlt\nhandler:\n" + EXIT,
                      {0x40: (INTR32, 0x08, "handler", 0)}, eflags=0x2 | AC | NT)
    s = passed(m)
    assert (s["cs"], s["ss"], s["cpl"]) == (0x08, 0x10, 0)
    assert s["esp"] == STACK0 - 12                                   # EIP, CS, EFLAGS
    eip, cs, eflags = dwords(m, STACK0 - 12, 3)
    assert (eip, cs & 0xFFFF) == (m.syms["there"] + 2, 0x08)
    assert eflags == 0x2 | AC | NT | IF
    assert s["eflags"] == 0x2 | AC                                   # IF, NT cleared; AC kept


def test_trap_gate_leaves_if_and_iret_returns():
    # measured: Unicorn 2.1.4 executes the protected-mode IRET itself
    m = run_pm_labels("sti\nint 0x40\nafter:\n" + EXIT + "handler:\npushfd\npop ebx\niretd\n",
                      {0x40: (TRAP32, 0x08, "handler", 0)})
    s = passed(m)
    core = m.cores[0]
    assert core.probe.gpr(3) & IF                                    # EFLAGS in the handler
    assert s["eip"] == m.syms["after"] + 4 and s["esp"] == STACK0 and s["eflags"] & IF


def test_exception_with_error_code_pushes_it_after_eip():
    # MOV DS with a selector beyond the GDT limit: #GP(selector), a fault
    code = "mov ax, 0x1000\nthere: mov ds, ax\nhlt\nhandler:\n" + EXIT
    m = run_pm_labels(code, {GP: (INTR32, 0x08, "handler", 0)})
    s = passed(m)
    assert s["esp"] == STACK0 - 16
    ec, eip, cs, _ = dwords(m, STACK0 - 16, 4)
    assert (ec, eip, cs & 0xFFFF) == (0x1000, m.syms["there"], 0x08)


def test_16bit_interrupt_gate_pushes_words():
    # a 16-bit gate into the 16-bit code segment 0x20 (base CODE): IP, CS, FLAGS, 2 bytes each
    code = ("there: int 0x40\nhlt\n.align 16\nh16:\n.code16\nmov al, 0\nout 0xf4, al\n")
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    m = run_pm(code, idt={0x40: gate(INTR16, 0x20, syms["h16"] - CODE)}, eflags=0x2 | IF)
    s = passed(m)
    assert s["cs"] == 0x20 and s["esp"] == STACK0 - 6
    assert words(m, STACK0 - 6, 3) == [(syms["there"] + 2) & 0xFFFF, 0x08, 0x2 | IF]
    assert not s["eflags"] & IF


def test_interrupt_from_cpl3_switches_to_the_tss_stack():
    code = ("there: int 0x40\nhlt\nhandler:\n" + EXIT)
    m = run_pm_labels(code, {0x40: (INTR32, 0x08, "handler", 3)}, cpl=3, eflags=0x2 | IF)
    s = passed(m)
    assert (s["cs"], s["ss"], s["cpl"]) == (0x08, 0x10, 0)
    assert s["esp"] == STACK0 - 20                                   # SS, ESP, EFLAGS, CS, EIP
    eip, cs, eflags, esp, ss = dwords(m, STACK0 - 20, 5)
    assert (eip, cs & 0xFFFF, esp, ss & 0xFFFF) == (m.syms["there"] + 2, 0x2B, STACK3, 0x33)
    assert eflags == 0x2 | IF


def test_return_to_cpl3_with_iret():
    code = ("int 0x40\nback: mov dx, cs\nmov bx, ss\nmov ecx, esp\nint 0x41\n"
            "handler: iretd\nreport:\n" + EXIT)
    m = run_pm_labels(code, {0x40: (INTR32, 0x08, "handler", 3),
                             0x41: (INTR32, 0x08, "report", 3)}, cpl=3)
    passed(m)
    p = m.cores[0].probe
    assert (p.gpr(2) & 0xFFFF, p.gpr(3) & 0xFFFF, p.gpr(1)) == (0x2B, 0x33, STACK3)


def test_conforming_handler_keeps_cpl3_and_its_stack():
    m = run_pm_labels("int 0x40\nhlt\nhandler:\nmov ebx, 1\nint 0x41\nexit:\n" + EXIT,
                      {0x40: (INTR32, 0x38, "handler", 3), 0x41: (INTR32, 0x08, "exit", 3)},
                      cpl=3)
    passed(m)
    # the second INT came from the conforming handler at CPL 3 (CS 0x38 | RPL 3)
    eip, cs, _, esp, ss = dwords(m, STACK0 - 20, 5)
    assert (cs & 0xFFFF, ss & 0xFFFF, esp) == (0x3B, 0x33, STACK3 - 12)


def test_into_delivers_vector_4_after_the_instruction_if_of():
    code = ("mov al, 0x7F\nadd al, 1\nthere: into\nhlt\nhandler:\n" + EXIT)   # 7F + 1 sets OF
    m = run_pm_labels(code, {4: (INTR32, 0x08, "handler", 0)})
    passed(m)
    assert dwords(m, STACK0 - 12, 1) == [m.syms["there"] + 1]
    m = run_pm_labels("into\n" + EXIT, {4: (INTR32, 0x08, CODE, 0)})
    assert m.verdict == "pass" and "EXCEPTION" not in m.cores[0].events     # OF = 0: nothing


# ---------------------------------------------------------------- faults during delivery
def fault_case(code: str, vectors: dict, *, catch: int, **kw):
    """Run ``code`` with gates ``vectors``; the handler of ``catch`` (same privilege,
    32-bit interrupt gate, DPL 3) reports: returns (error code, EIP pushed)."""
    entries = dict(vectors)
    entries[catch] = (INTR32, 0x08, "catch", 3)
    m = run_pm_labels(code + "\nhlt\ncatch:\n" + EXIT, entries, **kw)
    s = passed(m)
    frame = dwords(m, s["esp"], 2)
    return frame[0], frame[1], m


@pytest.mark.parametrize("gates, error_code", [
    ({0x41: (0xC, 0x08, 0, 3)}, 0x41 * 8 + 2),               # a call gate in the IDT
    ({0x41: (INTR32, 0x08, 0, 0)}, 0x41 * 8 + 2),            # INT n from CPL 3, gate DPL 0
    ({0x41: (INTR32, 0x00, 0, 3)}, 0),                       # null code selector: #GP(EXT = 0)
    ({0x41: (INTR32, 0x10, 0, 3)}, 0x10),                    # a data segment
    ({0x41: (INTR32, 0x1000, 0, 3)}, 0x1000),                # beyond the GDT limit
])
def test_int_n_gp_during_delivery(gates, error_code):
    ec, eip, m = fault_case("there: int 0x41", gates, catch=GP, cpl=3)
    assert (ec, eip) == (error_code, m.syms["there"])


def test_int_n_gate_not_present_is_np():
    idt = {0x41: (INTR32, 0x08, 0, 3)}
    code = "there: int 0x41"
    _, syms = assemble(".code32\n" + code + "\nhlt\ncatch:\n" + EXIT, CODE, "pm.S")
    g = pm_handler_idt(syms, {**idt, NP: (INTR32, 0x08, "catch", 3)})
    g[0x41] &= ~(1 << 47)
    m = run_pm(code + "\nhlt\ncatch:\n" + EXIT, idt=g, cpl=3)
    s = passed(m)
    assert dwords(m, s["esp"], 2) == [0x41 * 8 + 2, syms["there"]]


def test_code_segment_not_present_is_np_and_exceptions_set_ext():
    # #UD (a hardware exception: EXT = 1) through a gate to the not-present code segment 0x48
    ec, eip, m = fault_case("there: ud2", {UD: (INTR32, 0x48, 0, 0)}, catch=NP)
    assert (ec, eip) == (0x48 | 1, m.syms["there"])


def test_idt_limit_and_ext():
    # vector 0x41 beyond an IDT limit of 0x41 * 8 + 6: #GP(0x20A) for INT n; #UD's gate
    # beyond it: #GP(6 * 8 + 2 + 1)
    ec, _, _ = fault_case("int 0x41", {}, catch=GP, idt_limit=0x41 * 8 + 6)
    assert ec == 0x20A
    ec, _, _ = fault_case("ud2", {}, catch=GP, idt_limit=0x41 * 8 + 6)
    assert ec == 6 * 8 + 2 + 1


@pytest.mark.parametrize("esp0, ss0, vector, error_code", [
    (STACK0, 0x00, TS, 0),              # null SS for CPL 0: #TS(EXT), EXT = 0 for INT n
    (STACK0, 0x13, TS, 0x10),           # RPL 3 != the new CPL 0: #TS(SS)
    (STACK0, 0x58, TS, 0x58),           # read-only data: #TS(SS)
    (STACK0, 0x61, TS, 0x60),           # RPL 1, DPL 1 != 0: #TS(SS)
    (STACK0, 0x40, SS, 0x40),           # not present: #SS(SS)
    (0x10, 0x68, SS, 0x68),             # 16-bit stack, limit FH: the 5th push wraps to FFFCH: #SS(SS)
])
def test_stack_switch_faults(esp0, ss0, vector, error_code):
    # INT 0x40 from CPL 3 to a CPL-0 handler: the new stack comes from TSS_A; the fault's
    # handler is a task gate to task B, whose stack gets the error code (see below)
    code = "there: int 0x40\nhlt\nhandler:\nhlt\ntask_b:\n" + EXIT
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    idt = {0x40: gate(INTR32, 0x08, syms["handler"], 3), vector: gate(TASK, 0x50)}
    m = run_pm(code, idt=idt, cpl=3, tss_a=bytes(_tss32(esp0, ss0)),
               tss_b={"eip": syms["task_b"]})
    s = passed(m)
    assert s["tr"] == 0x50 and s["esp"] == STACK_B - 4
    assert dwords(m, STACK_B - 4, 1) == [error_code]
    assert dwords(m, TSS_A + 0x20, 1) == [syms["there"]]           # the old task's EIP: the INT


def test_tss_too_short_for_the_stack_is_ts_of_the_tss():
    # TR limit 0x0B: ESP0/SS0 (bytes 4-9) fit, a handler at CPL 0 from CPL 3 works; with limit
    # 0x08 SS0's last byte (9) is beyond it: #TS(TSS selector 0x18)
    code = "there: int 0x40\nhlt\nhandler:\n" + EXIT + "catch:\n" + EXIT
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    idt = {0x40: gate(INTR32, 0x08, syms["handler"], 3), TS: gate(INTR32, 0x38, syms["catch"], 0)}
    for limit, caught in ((0x0B, False), (0x08, True)):
        m = run_pm(code, idt=idt, cpl=3, tr_limit=limit, eflags=0x2 | IOPL3)
        s = passed(m)
        assert (s["eip"] == syms["catch"] + 4) is caught
        if caught:
            # the #TS handler is conforming (0x38): it runs at CPL 3 on the CPL-3 stack
            assert dwords(m, s["esp"], 2) == [0x18, syms["there"]]


def test_contributory_fault_during_gp_delivery_is_double_fault():
    # #GP(0x1000) from MOV DS; its gate's code segment is not present: #NP during #GP: #DF(0)
    code = "there: mov ax, 0x1000\nmov ds, ax\nhlt\ndf:\n" + EXIT
    m = run_pm_labels(code, {GP: (INTR32, 0x48, 0, 0), DF: (INTR32, 0x08, "df", 0)})
    s = passed(m)
    assert s["esp"] == STACK0 - 16
    assert dwords(m, STACK0 - 16, 2) == [0, m.syms["there"] + 4]


def test_fault_delivering_double_fault_is_a_triple_fault():
    m = run_pm_labels("mov ax, 0x1000\nmov ds, ax\nhlt\n", {})
    assert m.verdict == "shutdown" and "triple fault" in m.message


# ---------------------------------------------------------------- virtual-8086 mode
def enter_v86(iopl: int) -> str:
    """CPL-0 code that enters virtual-8086 mode at V86_CODE (CS 0x3100, IP 0) with
    SS:SP 0x2000:0x1000 and ES, DS, FS, GS = 0x11, 0x22, 0x33, 0x44 (IRETD frame)."""
    return (f"push 0x44\npush 0x33\npush 0x22\npush 0x11\npush 0x2000\npush 0x1000\n"
            f"push {0x2 | VM | iopl << 12:#x}\npush 0x3100\npush 0\niretd\n")


def test_interrupt_from_virtual_8086_mode():
    m = run_pm_labels(enter_v86(3) + "handler:\n" + EXIT, {0x40: (INTR32, 0x08, "handler", 3)},
                      v86="nop\nint 0x40\nhlt\n")
    s = passed(m)
    assert (s["cs"], s["ss"], s["cpl"]) == (0x08, 0x10, 0)
    assert (s["ds"], s["es"], s["fs"], s["gs"]) == (0, 0, 0, 0)       # loaded null
    assert not s["eflags"] & VM
    assert s["esp"] == STACK0 - 36
    frame = dwords(m, STACK0 - 36, 9)
    eip, cs, eflags, esp, ss, es, ds, fs, gs = frame
    assert (eip, cs & 0xFFFF, esp, ss & 0xFFFF) == (3, 0x3100, 0x1000, 0x2000)   # after INT n
    assert eflags == 0x2 | VM | IOPL3
    assert [v & 0xFFFF for v in (es, ds, fs, gs)] == [0x11, 0x22, 0x33, 0x44]


def test_int_n_in_virtual_8086_mode_with_iopl_below_3_is_gp0():
    m = run_pm_labels(enter_v86(0) + "catch:\n" + EXIT,
                      {0x40: (INTR32, 0x08, 0, 3), GP: (INTR32, 0x08, "catch", 0)},
                      v86="nop\nint 0x40\nhlt\n")
    s = passed(m)
    assert s["esp"] == STACK0 - 40                                   # with the error code
    ec, eip, cs = dwords(m, STACK0 - 40, 3)
    assert (ec, eip, cs & 0xFFFF) == (0, 1, 0x3100)                  # the INT itself faulted


def test_v86_handler_must_be_at_cpl0():
    # a gate to a DPL-3 code segment from virtual-8086 mode: #GP(selector + EXT = 0)
    m = run_pm_labels(enter_v86(3) + "catch:\n" + EXIT,
                      {0x40: (INTR32, 0x28, 0, 3), GP: (INTR32, 0x08, "catch", 0)},
                      v86="int 0x40\nhlt\n")
    s = passed(m)
    assert dwords(m, s["esp"], 1) == [0x28]


# ---------------------------------------------------------------- task gates
TASK_B_REPORT = ("task_b:\npushfd\npop eax\nmov [0x60000], eax\nmov [0x60004], esp\n"
                 "str word ptr [0x60008]\n")


def test_int_n_through_a_task_gate_switches_tasks_and_iret_returns():
    code = ("mov ebx, 0x1234\nthere: int 0x40\nback: mov ecx, 5\n" + EXIT
            + TASK_B_REPORT + "iretd\n")
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    m = run_pm(code, idt={0x40: gate(TASK, 0x50)}, tss_b={"eip": syms["task_b"]},
               eflags=0x2 | IF)
    s = passed(m)
    assert s["tr"] == 0x18 and s["eip"] == syms["back"] + 5 + 4      # back in task A
    flags_b, esp_b, tr_b = dwords(m, RESULT, 3)
    assert flags_b & NT and tr_b & 0xFFFF == 0x50 and esp_b == STACK_B
    assert words(m, TSS_B, 1) == [0x18]                              # B's previous-task link
    eip_a, eflags_a = dwords(m, TSS_A + 0x20, 2)
    assert (eip_a, eflags_a) == (syms["back"], 0x2 | IF)             # A saved after the INT
    assert dwords(m, TSS_A + 0x28 + 3 * 4, 1) == [0x1234]           # EBX
    core = m.cores[0]
    assert core.events.get("TASK_SWITCH") == 2                      # the INT and the IRET
    assert core.probe.cr(0) & (1 << 3)                              # CR0.TS


def test_exception_through_a_task_gate_pushes_its_error_code_on_the_new_stack():
    code = "mov ax, 0x1000\nthere: mov ds, ax\nhlt\n" + TASK_B_REPORT + EXIT
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    m = run_pm(code, idt={GP: gate(TASK, 0x50)}, tss_b={"eip": syms["task_b"]})
    s = passed(m)
    assert s["tr"] == 0x50 and s["esp"] == STACK_B - 4
    assert dwords(m, STACK_B - 4, 1) == [0x1000]
    assert dwords(m, TSS_A + 0x20, 1) == [syms["there"]]             # a fault: EIP of the MOV
    gdt = m.mem.read(GDT, GDT_LIMIT + 1)
    assert (gdt[0x18 + 5] & 0xF, gdt[0x50 + 5] & 0xF) == (11, 11)   # both busy (nesting)


def test_exception_through_a_task_gate_to_a_16bit_tss_pushes_a_word():
    # task gate to the 16-bit TSS 0x78: IP, FLAGS, SP and ES/CS/SS/DS from it; the error
    # code is pushed as a word (SDM "Task Switching": the size of the new TSS); the SDM
    # leaves bits 31:16 of the registers loaded from a 16-bit TSS undefined, so the new
    # task has a 16-bit stack (SS.B = 0) and only SP is checked
    code = ("mov ax, 0x1000\nthere: mov ds, ax\nhlt\n.align 16\nt16:\n.code16\n"
            "mov al, 0\nout 0xf4, al\n")
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    t16 = bytearray(0x2C)
    struct.pack_into("<HH", t16, 0x0E, syms["t16"] - CODE, 0x2)            # IP, FLAGS
    struct.pack_into("<H", t16, 0x1A, 0x7800)                              # SP
    struct.pack_into("<4H", t16, 0x22, 0x10, 0x20, 0x70, 0x10)             # ES CS SS DS
    m = run_pm(code, idt={GP: gate(TASK, 0x78)}, tss16=bytes(t16))
    s = passed(m)
    assert (s["tr"], s["cs"], s["ss"]) == (0x78, 0x20, 0x70)
    assert s["esp"] & 0xFFFF == 0x7800 - 2 and words(m, 0x7800 - 2, 1) == [0x1000]
    assert words(m, TSS_16, 1) == [0x18]                                   # the link
    assert s["eflags"] & NT
    assert dwords(m, TSS_A + 0x20, 1) == [syms["there"]]


# =========================================================================== under the stock L0
def test_l0_reinjects_an_intercepted_exception_through_a_legacy_gate():
    # stock KVM intercepts #UD and re-injects it (VM-entry event injection): the injected
    # #UD is delivered through the guest's 32-bit interrupt gate
    code = "there: ud2\nhlt\nhandler:\n" + EXIT
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    m = run_pm(code, idt={UD: gate(INTR32, 0x08, syms["handler"])}, under_l0=True)
    s = passed(m)
    assert m.exit_counts.get("EXCEPTION_NMI") == 1
    assert s["esp"] == STACK0 - 12 and dwords(m, STACK0 - 12, 1) == [syms["there"]]


def test_l0_task_gate_for_an_exception_pushes_its_error_code():
    # #GP(0x1000) through a task gate: a TASK_SWITCH exit (source IDT) whose IDT-vectoring
    # information holds the #GP and its error code; the L0 switches and pushes it
    code = "mov ax, 0x1000\nthere: mov ds, ax\nhlt\n" + TASK_B_REPORT + EXIT
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    m = run_pm(code, idt={GP: gate(TASK, 0x50)}, tss_b={"eip": syms["task_b"]}, under_l0=True)
    s = passed(m)
    assert m.exit_counts.get("TASK_SWITCH") == 1
    assert s["tr"] == 0x50 and s["esp"] == STACK_B - 4
    assert dwords(m, STACK_B - 4, 1) == [0x1000]
    assert dwords(m, TSS_A + 0x20, 1) == [syms["there"]]


# =========================================================================== under VMX: exits
from devirt_emu.testing.vmx_case import CODE_BASE, CaseRunner, legal_controls, run_case  # noqa: E402

EXCEPTION_NMI, APIC_ACCESS = 0, 44
HW_EXC = (1 << 31) | (3 << 8)                    # interruption information: valid, type 3
EC_VALID = 1 << 11


def vmx_pm32(exceptions: int = 0, *, secondary: int = 0, esp: int = STACK0,
             extra: dict | None = None) -> dict[str, int]:
    """VMCS fields of a 32-bit protected-mode guest on this file's GDT, IDT and TSS
    (paging off, which VMX allows an unrestricted guest; run_case's ept="identity"
    adds EPT)."""
    f = legal_controls({
        "CPU_BASED_VM_EXEC_CONTROL": 1 << 31,                      # activate secondary controls
        "SECONDARY_VM_EXEC_CONTROL": (1 << 7) | secondary,         # unrestricted guest
        "VM_ENTRY_CONTROLS": 0,                                    # not IA-32e mode
    })
    f.update({
        "EXCEPTION_BITMAP": exceptions,
        "GUEST_CR0": 0x31, "CR0_READ_SHADOW": 0x31, "GUEST_CR4": 1 << 13, "CR4_READ_SHADOW": 0,
        "GUEST_IA32_EFER": 0,
        **flat_pm32_fields(gdt=(GDT, GDT_LIMIT), idt=(IDT, 256 * 8 - 1),
                           tr=(0x18, TSS_A, 0x67, 0x8B), rsp=esp),
        "GUEST_LDTR_SELECTOR": 0, "GUEST_LDTR_AR_BYTES": 1 << 16,     # unusable
    })
    f.update(extra or {})
    return f


def vmx_memory(idt: dict[int, int]) -> dict[int, bytes]:
    return {GDT: gdt_image(GDT_ENTRIES, GDT_LIMIT), IDT: idt_image(idt), TSS_A: bytes(_tss32())}


def run_vmx32(code: str, gates: dict, runner=None, **kw):
    """A VMX case of 32-bit ``code`` (at CODE_BASE) with IDT gates (type, selector,
    label or offset, DPL)."""
    _, syms = assemble(".code32\n" + code, CODE_BASE, "case.S")
    idt = {v: gate(t, sel, syms[lab] if isinstance(lab, str) else lab, dpl)
           for v, (t, sel, lab, dpl) in gates.items()}
    memory = vmx_memory(idt)
    memory.update(kw.pop("memory", {}))
    run = runner.run if runner is not None else run_case
    return run(".code32\n" + code, vmcs=vmx_pm32(**kw), memory=memory, ept="identity")


def test_vmx_fault_during_int_n_delivery_records_the_int_as_idt_vectoring_info():
    # INT 0x41 through a gate whose code segment (0x48) is not present: #NP(0x48), EXT = 0;
    # with #NP intercepted, the exit reports the INT being delivered (type 4, vector 0x41)
    r = run_vmx32("nop\nthere: int 0x41", {0x41: (INTR32, 0x48, 0, 0)}, exceptions=1 << NP)
    assert r.outcome == "exit" and r.exit.reason == EXCEPTION_NMI, str(r)
    assert r.exit.interruption_info == HW_EXC | EC_VALID | NP and r.exit.error_code == 0x48
    assert r.exit.idt_vectoring_info == (1 << 31) | (4 << 8) | 0x41
    assert r.exit.guest_rip == r.symbols["there"] and r.steps == 1


def test_vmx_fault_during_exception_delivery_has_ext_and_vectoring_info():
    # #UD (hardware exception 6, no error code) through the same kind of gate: #NP(0x48 | EXT)
    r = run_vmx32("there: ud2", {UD: (INTR32, 0x48, 0, 0)}, exceptions=1 << NP)
    assert r.exit.reason == EXCEPTION_NMI and r.exit.error_code == 0x49, str(r)
    assert r.exit.idt_vectoring_info == (1 << 31) | (3 << 8) | UD
    assert r.exit.guest_rip == r.symbols["there"]


def test_vmx_no_exit_delivers_through_the_legacy_gate():
    r = run_vmx32("int 0x40\nhandler:\nhlt", {0x40: (INTR32, 0x08, "handler", 0)})
    assert r.outcome == "no_exit" and r.no_exit.why == "halted", str(r)
    assert r.no_exit.regs["rsp"] == STACK0 - 12


def test_vmx_real_mode_fault_during_delivery_has_no_error_code():
    # an unrestricted guest in real-address mode: INT 0x40 beyond an IDT limit of 0x3F is
    # #GP; in real mode no error code is delivered, so the exit's interruption information
    # has bit 11 clear; the INT (software interrupt 0x40) is the event being delivered
    fields = vmx_pm32(exceptions=1 << GP, extra={
        "GUEST_CR0": 0x30, "CR0_READ_SHADOW": 0x30, "GUEST_IDTR_BASE": 0, "GUEST_IDTR_LIMIT": 0x3F,
        "GUEST_CS_SELECTOR": 0x1234, "GUEST_CS_BASE": CODE_BASE, "GUEST_CS_LIMIT": 0xFFFF,
        "GUEST_CS_AR_BYTES": 0x9B, "GUEST_RIP": 0, "GUEST_RSP": 0x1000,
        "GUEST_TR_SELECTOR": 0, "GUEST_TR_BASE": 0, "GUEST_TR_LIMIT": 0xFFFF,
        **{f"GUEST_{s}_{k}": v for s in ("SS", "DS", "ES", "FS", "GS")
           for k, v in (("SELECTOR", 0x2000), ("BASE", 0x20000), ("LIMIT", 0xFFFF),
                        ("AR_BYTES", 0x93))}})
    r = run_case(".code16\nnop\nint 0x40", vmcs=fields, ept="identity")
    assert r.outcome == "exit" and r.exit.reason == EXCEPTION_NMI, str(r)
    assert r.exit.interruption_info == HW_EXC | GP
    assert r.exit.idt_vectoring_info == (1 << 31) | (4 << 8) | 0x40
    assert r.exit.guest_rip == 1                                    # IP of the INT
    # SDM "Information for VM Exits Due to Instruction Execution": the length is defined
    # for a fault during delivery of a software interrupt (the INT n's, 2 bytes)
    assert r.exit.instruction_length == 2


# ---------------------------------------------------------------- APIC-access page and delivery
APIC_PAGE = 0x700000
APIC_FIELDS = {"APIC_ACCESS_ADDR": APIC_PAGE}
VIRTUALIZE_APIC_ACCESSES = 1 << 0


def test_vmx_push_onto_the_apic_access_page_during_delivery_is_access_type_3():
    # SDM "Exit Qualification for APIC-Access VM Exits": bits 15:12 = 3, linear access during
    # event delivery; bits 11:0 the offset; the event is the IDT-vectoring information, and
    # the instruction length is that of the INT n (2).  Fault-like: ESP is unchanged.
    for code, vinfo, length in (("there: int 0x40", (1 << 31) | (4 << 8) | 0x40, 2),
                                ("there: ud2", (1 << 31) | (3 << 8) | UD, None)):
        r = run_vmx32(code, {0x40: (INTR32, 0x08, 0, 0), UD: (INTR32, 0x08, 0, 0)},
                      secondary=VIRTUALIZE_APIC_ACCESSES, esp=APIC_PAGE + 0x100,
                      extra=APIC_FIELDS)
        assert r.outcome == "exit" and r.exit.reason == APIC_ACCESS, str(r)
        assert r.exit.qualification == (3 << 12) | 0x0FC              # EFLAGS, the first push
        assert r.exit.idt_vectoring_info == vinfo
        assert r.exit.instruction_length == length
        assert r.exit.guest_rip == r.symbols["there"] and r.exit.regs["rsp"] == APIC_PAGE + 0x100


def test_vmx_idt_on_the_apic_access_page():
    fields = {**APIC_FIELDS, "GUEST_IDTR_BASE": APIC_PAGE}
    r = run_vmx32("there: int 0x40", {}, secondary=VIRTUALIZE_APIC_ACCESSES, extra=fields)
    assert r.exit.reason == APIC_ACCESS and r.exit.qualification == (3 << 12) | 0x200, str(r)


def test_vmx_push_virtualized_at_080h_then_exit_at_the_next_push():
    # with "use TPR shadow" a write of at most 32 bits at offset 080H is virtualized, during
    # event delivery too (SDM: an "operation" includes the delivery of an event through the
    # IDT): EFLAGS (2) goes to VTPR, APIC-write emulation clears VTPR bytes 3:1; the next
    # push (CS, at 07CH) exits
    vapic = 0x710000
    runner = CaseRunner()
    primary = legal_controls({"CPU_BASED_VM_EXEC_CONTROL": (1 << 31) | (1 << 21)})
    r = run_vmx32("int 0x40", {0x40: (INTR32, 0x08, 0, 0)}, runner=runner,
                  secondary=VIRTUALIZE_APIC_ACCESSES, esp=APIC_PAGE + 0x84,
                  extra={**APIC_FIELDS, **primary, "VIRTUAL_APIC_PAGE_ADDR": vapic,
                         "TPR_THRESHOLD": 0},
                  memory={vapic + 0x80: b"\x11\x22\x33\x44", APIC_PAGE + 0x80: b"\x55" * 4})
    assert r.exit.reason == APIC_ACCESS and r.exit.qualification == (3 << 12) | 0x07C, str(r)
    assert runner.machine.mem.read(vapic + 0x80, 4) == b"\x02\x00\x00\x00"
    assert runner.machine.mem.read(APIC_PAGE + 0x80, 4) == b"\x55" * 4


def test_virtual_8086_code_is_decoded_as_16bit():
    # OUT DX, AX (EF) writes 2 bytes in 16-bit code, EAX (4) in 32-bit code: the 16-bit
    # write of 0 passes, a 32-bit one would write 0x12340000 (a failing verdict)
    code = "mov eax, 0x12340000\n" + enter_v86(3)
    m = run_pm(code, idt={}, v86="mov dx, 0xf4\nmov ax, 0\nout dx, ax\nhlt\n")
    assert m.verdict == "pass", (m.verdict, m.message)


def test_external_interrupt_in_protected_mode():
    # a self-IPI (x2APIC SELF IPI register) of vector 0x40 is taken once IF = 1 (after the
    # STI's shadow): the frame returns to the instruction after the NOP; delivering it
    # through a not-present gate is #NP(0x40 * 8 + 2 + EXT), EXT = 1 for an external interrupt
    code = ("mov ecx, 0x1B\nmov eax, 0xFEE00D00\nxor edx, edx\nwrmsr\n"     # x2APIC mode
            "mov ecx, 0x80F\nmov eax, 0x1FF\nwrmsr\n"                        # SVR: enabled
            "mov ecx, 0x83F\nmov eax, 0x40\nwrmsr\n"                          # self IPI 0x40
            "sti\nnop\nthere: hlt\nhandler:\n" + EXIT)
    m = run_pm_labels(code, {0x40: (INTR32, 0x08, "handler", 0)})
    s = passed(m)
    assert dwords(m, STACK0 - 12, 1) == [m.syms["there"]]
    assert not s["eflags"] & IF
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    g = pm_handler_idt(syms, {NP: (INTR32, 0x08, "handler", 0)})
    g[0x40] = gate(INTR32, 0x08, syms["handler"], present=False)
    m = run_pm(code, idt=g)
    s = passed(m)
    assert dwords(m, s["esp"], 1) == [0x40 * 8 + 2 + 1]


def test_stack_switch_from_a_16bit_tss():
    # the current TSS is 16-bit: SP0 at offset 2, SS0 at offset 4 (SDM "16-Bit Task-State
    # Segment"); the 32-bit gate still pushes dwords
    t16 = bytearray(0x2C)
    struct.pack_into("<HH", t16, 2, 0x7000, 0x10)
    code = "there: int 0x40\nhlt\nhandler:\n" + EXIT
    _, syms = assemble(".code32\n" + code, CODE, "pm.S")
    m = run_pm(code, idt={0x40: gate(INTR32, 0x08, syms["handler"], 3)}, cpl=3, tr16=True,
               tss16=bytes(t16))
    s = passed(m)
    assert (s["ss"], s["esp"]) == (0x10, 0x7000 - 20)
    assert dwords(m, 0x7000 - 20, 5)[::3] == [syms["there"] + 2, STACK3]


# =========================================================================== the task checks alone
from devirt_emu.platform import tasks  # noqa: E402


def _raises(fn, *args):
    try:
        fn(*args)
    except tasks.TaskFault as f:
        return f.vector, f.error_code
    return None


def test_new_task_segment_checks():
    # SDM Table 7-1, error codes with the selector and EXT
    code0 = GDT_ENTRIES[0x08]
    data0, data3 = GDT_ENTRIES[0x10], GDT_ENTRIES[0x30]
    assert _raises(tasks.check_new_cs, 0x08, code0, 1) is None
    assert _raises(tasks.check_new_cs, 0x0B, code0, 1) == (TS, 0x09)      # DPL 0 != RPL 3
    assert _raises(tasks.check_new_cs, 0x10, data0, 1) == (TS, 0x11)      # not code
    assert _raises(tasks.check_new_cs, 0x3B, GDT_ENTRIES[0x38], 0) is None  # conforming, DPL <= RPL
    assert _raises(tasks.check_new_cs, 0x48, GDT_ENTRIES[0x48], 0) == (NP, 0x48)
    assert _raises(tasks.check_new_cs, 0x00, None, 1) == (TS, 0x01)       # null
    assert _raises(tasks.check_new_ss, 0x33, data3, 3, 0) is None
    assert _raises(tasks.check_new_ss, 0x10, data0, 3, 0) == (TS, 0x10)   # RPL, DPL != CPL 3
    assert _raises(tasks.check_new_ss, 0x58, GDT_ENTRIES[0x58], 0, 0) == (TS, 0x58)  # read-only
    assert _raises(tasks.check_new_ss, 0x40, GDT_ENTRIES[0x40], 0, 0) == (SS, 0x40)  # not present
    assert tasks.check_new_data_segment(0, None, 3, 0) is False           # null: loaded unusable
    assert tasks.check_new_data_segment(0x33, data3, 3, 0) is True
    assert _raises(tasks.check_new_data_segment, 0x10, data0, 3, 0) == (TS, 0x10)   # DPL 0 < CPL 3
    assert _raises(tasks.check_new_data_segment, 0x40, GDT_ENTRIES[0x40], 0, 1) == (NP, 0x41)
    assert tasks.check_new_data_segment(0x3B, GDT_ENTRIES[0x38], 3, 0) is True      # conforming code
    assert _raises(tasks.check_new_data_segment, 0x0B, code0 & ~(2 << 40), 0, 0) == (TS, 0x08)
    ldt = seg(0x1000, 0xFF, 0x82)
    assert tasks.check_new_ldt(0, None, 1) is False
    assert tasks.check_new_ldt(0x80, ldt, 1) is True
    assert _raises(tasks.check_new_ldt, 0x84, ldt, 1) == (TS, 0x85)      # TI = 1
    assert _raises(tasks.check_new_ldt, 0x80, data0, 1) == (TS, 0x81)    # not an LDT
    assert _raises(tasks.check_new_ldt, 0x80, ldt & ~(1 << 47), 0) == (TS, 0x80)   # not present
