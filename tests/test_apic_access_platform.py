"""APIC-access exits on the accesses the platform makes itself: event delivery and INS/OUTS.

Expectations are literals from the Intel SDM Vol. 3C:

* "Exit Qualification for APIC-Access VM Exits": bits 11:0 the page offset,
  bits 15:12 the access type: 0 linear read and 1 linear write during
  instruction execution, 3 linear access during event delivery.
* "Information for VM Exits During Event Delivery": an exit with access
  type 3 has valid IDT-vectoring information (the event being delivered:
  bits 7:0 vector, 10:8 type, 11 error code valid, 31 valid); for a software
  interrupt or exception the VM-exit instruction length is the INT's.
* "Virtualizing Memory-Mapped APIC Accesses": the exit is fault-like (the
  access did not happen); "an operation" is an iteration of a REP string
  instruction (the iterations before it are done), or the delivery of an
  event; with "use TPR shadow", a read or write of at most 32 bits at offset
  080H is virtualized (reads return VTPR's bytes; a write goes to VTPR and
  APIC-write emulation clears its bytes 3:1).
"""

import pytest

from devirt_emu.platform import longmode
from devirt_emu.testing.vmx_case import CODE_BASE, CaseRunner, legal_controls

from case_asserts import assert_exit, assert_halted

APIC_ACCESS = 44
PAGE = 0x500000                        # the APIC-access page (RAM)
VAPIC = 0x600000
VIRTUALIZE_APIC_ACCESSES = 1 << 0      # secondary control
TPR_SHADOW, ACTIVATE_SECONDARY = 1 << 21, 1 << 31
READ, WRITE, DELIVERY = 0 << 12, 1 << 12, 3 << 12


@pytest.fixture(scope="module")
def runner():
    return CaseRunner()


def controls(tpr_shadow: bool = False) -> dict:
    f = legal_controls({"CPU_BASED_VM_EXEC_CONTROL": ACTIVATE_SECONDARY
                        | (TPR_SHADOW if tpr_shadow else 0),
                        "SECONDARY_VM_EXEC_CONTROL": VIRTUALIZE_APIC_ACCESSES})
    f["APIC_ACCESS_ADDR"] = PAGE
    if tpr_shadow:
        f.update(VIRTUAL_APIC_PAGE_ADDR=VAPIC, TPR_THRESHOLD=0)
    return f


def run(runner, code, *, tpr_shadow=False, memory=None):
    mem = {PAGE + 0x300: b"\x33" * 4, PAGE + 0x80: b"\x44" * 4, VAPIC + 0x80: b"\x57\x66\x77\x88"}
    mem.update(memory or {})
    return runner.run(code, vmcs=controls(tpr_shadow), memory=mem)


# ---------------------------------------------------------------- INS / OUTS
def test_ins_store_on_the_page_is_a_linear_write(runner):
    # port 0x80 reads all ones (nothing there); the store to the page exits, fault-like
    r = run(runner, "mov rdi, 0x500300\nmov dx, 0x80\nthere: insb")
    e = assert_exit(r, APIC_ACCESS, WRITE | 0x300, r.symbols["there"])
    assert e.idt_vectoring_info == 0
    assert e.regs["rdi"] == 0x500300
    assert runner.machine.mem.read(PAGE + 0x300, 4) == b"\x33" * 4


def test_outs_load_from_the_page_is_a_linear_read(runner):
    r = run(runner, "mov rsi, 0x500300\nmov dx, 0x80\nthere: outsd")
    e = assert_exit(r, APIC_ACCESS, READ | 0x300, r.symbols["there"])
    assert e.regs["rsi"] == 0x500300 and e.idt_vectoring_info == 0


def test_rep_ins_keeps_the_iterations_before_the_page(runner):
    # from 0x4FFFFE, 4 iterations: two below the page, the third exits at offset 0
    r = run(runner, "mov rdi, 0x4FFFFE\nmov rcx, 4\nmov dx, 0x80\nthere: rep insb",
            memory={0x4FFFFC: bytes(4)})
    e = assert_exit(r, APIC_ACCESS, WRITE | 0x000, r.symbols["there"])
    assert (e.regs["rcx"], e.regs["rdi"]) == (2, 0x500000)
    assert runner.machine.mem.read(0x4FFFFC, 4) == b"\x00\x00\xff\xff"


def test_virtualized_outs_reads_vtpr(runner):
    # OUTSB of the byte at 080H to the test-exit port: the byte written is VTPR's (57H)
    r = run(runner, "mov rsi, 0x500080\nmov dx, 0xf4\nouts dx, byte ptr [rsi]", tpr_shadow=True)
    assert r.outcome == "no_exit", str(r)
    assert "wrote 0x57 to the exit port" in r.no_exit.message


def test_virtualized_ins_writes_vtpr(runner):
    r = run(runner, "mov rdi, 0x500080\nmov dx, 0x80\ninsb\nhlt", tpr_shadow=True)
    assert_halted(r)
    assert runner.machine.mem.read(VAPIC + 0x80, 4) == b"\xff\x00\x00\x00"
    assert runner.machine.mem.read(PAGE + 0x80, 4) == b"\x44" * 4


# ---------------------------------------------------------------- 64-bit event delivery
def idt(vector: int, handler: int) -> dict:
    return {longmode.IDT + 16 * vector: longmode.idt_gate(handler)}


def test_64bit_frame_push_onto_the_page(runner):
    # INT3 (a software exception, type 6, length 1) with RSP at 0x500100: SS is pushed first,
    # at 0x5000F8
    r = run(runner, "mov rsp, 0x500100\nthere: int3", memory=idt(3, CODE_BASE))
    e = assert_exit(r, APIC_ACCESS, DELIVERY | 0x0F8, r.symbols["there"])
    assert e.idt_vectoring_info == (1 << 31) | (6 << 8) | 3
    assert e.instruction_length == 1
    assert e.regs["rsp"] == 0x500100


def test_64bit_frame_below_the_page_is_not_an_access(runner):
    r = run(runner, "mov rsp, 0x501100\nint3\nhandler: hlt", memory=idt(3, CODE_BASE + 8))
    assert_halted(r)


def test_64bit_gate_on_the_page(runner):
    # the IDT itself on the APIC-access page: reading gate 3 (offset 030H) exits
    code = ("mov word ptr [rsp-16], 0xfff\nmov rax, 0x500000\nmov qword ptr [rsp-14], rax\n"
            "lidt [rsp-16]\nthere: int3")
    r = run(runner, code)
    e = assert_exit(r, APIC_ACCESS, DELIVERY | 0x030, r.symbols["there"])
    assert e.idt_vectoring_info == (1 << 31) | (6 << 8) | 3


def test_without_the_control_platform_accesses_reach_memory(runner):
    r = runner.run("mov rdi, 0x500300\nmov dx, 0x80\ninsb\nhlt", memory={PAGE + 0x300: bytes(4)})
    assert_halted(r)
    assert runner.machine.mem.read(PAGE + 0x300, 1) == b"\xff"
