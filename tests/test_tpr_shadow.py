"""The TPR shadow at run time: MOV CR8 on VTPR, TPR-below-threshold exits after MOV to CR8
and right after VM entry.

Expectations are written here from the Intel SDM Vol. 3C as literals:

* "Virtualizing CR8-Based TPR Accesses": with "use TPR shadow" (primary
  processor-based control bit 21), a MOV from CR8 that does not exit loads
  bits 3:0 of its destination with VTPR[7:4] and clears bits 63:4; a MOV to
  CR8 stores bits 3:0 of its source in VTPR[7:4] and clears the rest of the
  32-bit VTPR (byte 80H of the virtual-APIC page), then performs TPR
  virtualization: with virtual-interrupt delivery 0, a VM exit "TPR below
  threshold" (basic reason 43) if VTPR[7:4] < TPR_THRESHOLD[3:0].  That
  exit is trap-like: GUEST_RIP is the next instruction; its qualification
  is 0.  The local APIC's TPR is not accessed.
* "CR8-load exiting" (bit 19) and "CR8-store exiting" (bit 20) make the MOVs
  exit with reason 28 (control-register access) instead; qualification bits
  3:0 = 8 (CR8), 5:4 = access type (0 MOV to CR, 1 MOV from CR), 11:8 = GPR.
* "VM Exits Induced by the TPR Threshold": with "use TPR shadow" and
  "virtualize APIC accesses" (secondary bit 0) both 1 and virtual-interrupt
  delivery 0, a VM exit with reason 43 occurs immediately after VM entry if
  TPR_THRESHOLD[3:0] > VTPR[7:4]; it follows event injection, is not
  blocked by RFLAGS.IF or the interruptibility state, has priority over
  pending MTF and interrupt-window exits, and wakes a processor that the
  entry put in the HLT state.  With "use TPR shadow" 1 and "virtualize APIC
  accesses" 0 the same condition is instead a VM-entry failure
  (VMfailValid, error 7: invalid control fields).
"""
import pytest

from devirt_emu.testing.vmx_case import CODE_BASE, CaseRunner
from devirt_emu.vmx.entry import FailureKind

from case_asserts import assert_exit, assert_halted

PROC, PROC2 = "CPU_BASED_VM_EXEC_CONTROL", "SECONDARY_VM_EXEC_CONTROL"
INTR_WINDOW_EXITING = 1 << 2
CR8_LOAD_EXITING, CR8_STORE_EXITING = 1 << 19, 1 << 20
TPR_SHADOW = 1 << 21
MONITOR_TRAP_FLAG = 1 << 27
ACTIVATE_SECONDARY = 1 << 31
VIRTUALIZE_APIC_ACCESSES = 1 << 0
CR_ACCESS, TPR_BELOW_THRESHOLD = 28, 43
RAX, RBX = 0, 3

VAPIC = 0x600000
APIC_PAGE = 0x500000
IDT_BASE = 0x12000                      # the fresh state's IDTR base


@pytest.fixture(scope="module")
def runner():
    return CaseRunner()


def tpr_fields(threshold=0, extra=0, apic_access=False):
    fields = {PROC: TPR_SHADOW | extra, "VIRTUAL_APIC_PAGE_ADDR": VAPIC,
              "TPR_THRESHOLD": threshold}
    if apic_access:
        fields[PROC] |= ACTIVATE_SECONDARY
        fields.update({PROC2: VIRTUALIZE_APIC_ACCESSES, "APIC_ACCESS_ADDR": APIC_PAGE})
    return fields


def run(runner, code, fields, vtpr=b"\x00\x00\x00\x00", memory=None, **kw):
    mem = {VAPIC + 0x80: vtpr}
    mem.update(memory or {})
    return runner.run(code, vmcs=fields, legal=True, memory=mem, **kw)


def vtpr(runner):
    return runner.machine.mem.read(VAPIC + 0x80, 4)


# ---------------------------------------------------------------------------- MOV CR8
def test_mov_from_cr8_reads_vtpr_bits_7_4(runner):
    code = "mov rbx, -1\nmov rbx, cr8\nhlt"
    n = assert_halted(run(runner, code, tpr_fields(), vtpr=b"\xa7\xff\xff\xff"))
    assert n.regs["rbx"] == 0xA
    assert runner.core.lapic.tpr == 0


def test_mov_to_cr8_writes_vtpr_and_clears_the_rest(runner):
    code = "mov rax, 0x9\nmov cr8, rax\nmov rbx, cr8\nhlt"
    n = assert_halted(run(runner, code, tpr_fields(), vtpr=b"\x0f\x11\x22\x33"))
    assert vtpr(runner) == b"\x90\x00\x00\x00"
    assert n.regs["rbx"] == 0x9
    assert runner.core.lapic.tpr == 0            # the physical TPR is untouched


def test_without_tpr_shadow_mov_cr8_is_the_local_apic_tpr(runner):
    code = "mov rax, 0x9\nmov cr8, rax\nmov rbx, cr8\nhlt"
    n = assert_halted(run(runner, code, {}, vtpr=b"\x0f\x11\x22\x33"))
    assert n.regs["rbx"] == 0x9
    assert runner.core.lapic.tpr == 0x90
    assert vtpr(runner) == b"\x0f\x11\x22\x33"


def test_mov_to_cr8_below_the_threshold_is_a_trap_like_exit(runner):
    code = "mov rax, 2\nmov cr8, rax\nnop"
    r = run(runner, code, tpr_fields(threshold=3), vtpr=b"\x50\x00\x00\x00")
    e = assert_exit(r, TPR_BELOW_THRESHOLD, 0, CODE_BASE + 7 + 4)   # after the MOV to CR8
    assert e.instruction_length is None
    assert vtpr(runner) == b"\x20\x00\x00\x00"                      # the write completed
    assert r.steps == 2
    assert runner.core.lapic.tpr == 0


@pytest.mark.parametrize("value", [3, 4, 15])
def test_mov_to_cr8_at_or_above_the_threshold_does_not_exit(runner, value):
    code = f"mov rax, {value}\nmov cr8, rax\nhlt"
    assert_halted(run(runner, code, tpr_fields(threshold=3), vtpr=b"\x50\x00\x00\x00"))
    assert vtpr(runner) == bytes([value << 4, 0, 0, 0])


def test_cr8_load_exiting_comes_first_and_vtpr_keeps_its_value(runner):
    r = run(runner, "mov rax, 1\nmov cr8, rax", tpr_fields(threshold=3, extra=CR8_LOAD_EXITING),
            vtpr=b"\x50\x00\x00\x00")
    assert_exit(r, CR_ACCESS, 8 | 0 << 4 | RAX << 8, CODE_BASE + 7)
    assert vtpr(runner) == b"\x50\x00\x00\x00"


def test_cr8_store_exiting_comes_first(runner):
    r = run(runner, "mov rbx, cr8", tpr_fields(extra=CR8_STORE_EXITING), vtpr=b"\x50\x00\x00\x00")
    assert_exit(r, CR_ACCESS, 8 | 1 << 4 | RBX << 8, CODE_BASE)


def test_mov_to_cr8_with_bits_63_4_set_is_gp_not_a_vtpr_write(runner):
    # #GP(0) through the all-zero IDT ends in a triple fault (reason 2) with VTPR unchanged
    r = run(runner, "mov rax, 0x10\nmov cr8, rax", tpr_fields(), vtpr=b"\x50\x00\x00\x00")
    assert r.outcome == "exit" and r.exit.reason == 2, str(r)
    assert vtpr(runner) == b"\x50\x00\x00\x00"


# ---------------------------------------------------------------------------- at VM entry
def test_entry_with_threshold_above_vtpr_exits_before_any_instruction(runner):
    r = run(runner, "nop\nhlt", tpr_fields(threshold=6, apic_access=True), vtpr=b"\x57\x00\x00\x00")
    assert_exit(r, TPR_BELOW_THRESHOLD, 0, CODE_BASE)
    assert r.steps == 0


def test_entry_with_threshold_equal_to_vtpr_does_not_exit(runner):
    assert_halted(run(runner, "nop\nhlt", tpr_fields(threshold=5, apic_access=True),
                      vtpr=b"\x57\x00\x00\x00"))


def test_entry_without_apic_access_virtualization_fails_instead(runner):
    r = run(runner, "nop", tpr_fields(threshold=6), vtpr=b"\x57\x00\x00\x00")
    assert r.outcome == "entry_failure", str(r)
    assert r.entry_failure.kind is FailureKind.VMFAIL_VALID and r.entry_failure.error == 7


def test_entry_exit_has_priority_over_mtf_and_the_interrupt_window(runner):
    fields = tpr_fields(threshold=6, extra=MONITOR_TRAP_FLAG | INTR_WINDOW_EXITING,
                        apic_access=True)
    r = run(runner, "nop\nhlt", fields, vtpr=b"\x57\x00\x00\x00", regs={"rflags": 0x202})
    assert_exit(r, TPR_BELOW_THRESHOLD, 0, CODE_BASE)


def test_entry_exit_follows_event_injection(runner):
    # inject software interrupt 0x30 (type 4, valid, instruction length 2): the exit comes
    # after delivery, so GUEST_RIP is the handler and the frame is on the stack
    src = "int 0x30\nhandler: hlt"
    handler = CODE_BASE + 2
    gate = (handler & 0xFFFF) | 0x08 << 16 | 0xE << 40 | 1 << 47 | ((handler >> 16) & 0xFFFF) << 48
    fields = tpr_fields(threshold=6, apic_access=True)
    fields.update(VM_ENTRY_INTR_INFO_FIELD=1 << 31 | 4 << 8 | 0x30, VM_ENTRY_INSTRUCTION_LEN=2)
    r = run(runner, src, fields, vtpr=b"\x57\x00\x00\x00",
            memory={IDT_BASE + 16 * 0x30: gate.to_bytes(16, "little")})
    e = assert_exit(r, TPR_BELOW_THRESHOLD, 0, handler)
    assert e.regs["rsp"] == 0x9F000 - 5 * 8                 # SS, RSP, RFLAGS, CS, RIP pushed


def test_entry_exit_wakes_the_hlt_activity_state(runner):
    fields = tpr_fields(threshold=6, apic_access=True)
    fields["GUEST_ACTIVITY_STATE"] = 1                      # HLT
    r = run(runner, "nop", fields, vtpr=b"\x57\x00\x00\x00")
    assert_exit(r, TPR_BELOW_THRESHOLD, 0, CODE_BASE)
    assert r.vmcs["GUEST_ACTIVITY_STATE"] == 0              # active


def test_entry_in_hlt_without_the_condition_stays_halted(runner):
    fields = tpr_fields(threshold=5, apic_access=True)
    fields["GUEST_ACTIVITY_STATE"] = 1
    r = run(runner, "nop", fields, vtpr=b"\x57\x00\x00\x00")
    assert_halted(r)
    assert r.steps == 0
