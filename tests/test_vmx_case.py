"""End-to-end VMX cases: real instructions on a real core under a VMCS (devirt_emu.testing.vmx_case).

Every expectation is written here from the Intel SDM Vol. 3C, as literals:
exit reasons (Appendix C), exit qualifications (Section "Exit Qualification
for ..." tables: control-register accesses, I/O instructions, INVLPG, #PF),
VM-exit interruption information (bits 7:0 vector, 10:8 type with 3 =
hardware exception and 6 = software exception, bit 11 error code valid,
bit 31 valid), instruction lengths from the instructions' encodings, and the
conditions under which each instruction exits (Chapter "VMX Non-Root
Operation").  Control bits are spelled out by number below, independently
of devirt_emu.vmx.controls.
"""
import struct

import pytest

from devirt_emu.testing.vmx_case import (
    CODE_BASE, DEFAULT_CONTROLS, SCRATCH_BASE, CaseError, io_bitmaps, legal_controls, msr_bitmap,
    run_case)
from devirt_emu.platform import longmode as LM
from devirt_emu.vmx.entry import FailureKind

PROC = "CPU_BASED_VM_EXEC_CONTROL"
# primary processor-based controls (SDM "Primary Processor-Based VM-Execution Controls")
INTR_WINDOW = 1 << 2
HLT_EXITING = 1 << 7
INVLPG_EXITING = 1 << 9
RDTSC_EXITING = 1 << 12
CR3_LOAD_EXITING = 1 << 15
CR8_STORE_EXITING = 1 << 20
UNCOND_IO_EXITING = 1 << 24
USE_IO_BITMAPS = 1 << 25
USE_MSR_BITMAPS = 1 << 28
PAUSE_EXITING = 1 << 30

# exit reasons (SDM Appendix C)
EXCEPTION_NMI, TRIPLE_FAULT, INTERRUPT_WINDOW, CPUID, HLT, INVLPG, RDTSC, VMCALL = 0, 2, 7, 10, 12, 14, 16, 18
CR_ACCESS, IO_INSTRUCTION, MSR_READ, MSR_WRITE, INVALID_STATE, PAUSE = 28, 30, 31, 32, 33, 40

UD, DF, GP, PF = 6, 8, 13, 14
IA32_TSC, IA32_EFER, IA32_FS_BASE = 0x10, 0xC0000080, 0xC0000100
UNMAPPED = 0x4000_0000          # 1 GiB: beyond the 16 MiB the fresh page tables map


def case(code, controls=0, vmcs=None, **kw):
    """A case with ``controls`` as the primary processor-based controls, made legal."""
    fields = {PROC: controls}
    fields.update(vmcs or {})
    return run_case(code, vmcs=fields, legal=True, **kw)


def assert_exit(r, reason, *, length=None, qualification=0, rip=CODE_BASE):
    assert r.outcome == "exit", str(r)
    e = r.exit
    assert e.reason == reason and e.exit_reason == reason, str(r)
    assert e.qualification == qualification, str(r)
    if length is not None:
        assert e.instruction_length == length, str(r)
    assert e.guest_rip == rip, str(r)
    return e


def assert_no_exit(r, why="halted"):
    assert r.outcome == "no_exit", str(r)
    assert r.no_exit.why == why, str(r)
    return r.no_exit


# --------------------------------------------------------------------------- unconditional exits
def test_cpuid_exits_unconditionally_and_does_not_execute():
    r = run_case("cpuid", regs={"rax": 7, "rcx": 0})
    e = assert_exit(r, CPUID, length=2)       # 0F A2
    assert e.name == "CPUID"
    assert r.steps == 0                       # a fault-like exit: CPUID did not retire
    assert e.regs["rax"] == 7 and e.regs["rbx"] == 0 and e.regs["rdx"] == 0


def test_cpuid_after_other_instructions_reports_its_own_rip():
    r = run_case("nop\nxor eax, eax\nthere: cpuid")
    assert_exit(r, CPUID, length=2, rip=r.symbols["there"])
    assert r.steps == 2


def test_vmcall_exits_unconditionally():
    assert_exit(run_case("vmcall"), VMCALL, length=3)       # 0F 01 C1


# --------------------------------------------------------------------------- HLT, RDTSC, PAUSE
def test_hlt_exits_with_hlt_exiting():
    assert_exit(case("hlt", HLT_EXITING), HLT, length=1)


def test_hlt_without_hlt_exiting_halts_the_guest():
    n = assert_no_exit(case("hlt"))
    assert n.guest_rip == CODE_BASE + 1


def test_rdtsc_exits_with_rdtsc_exiting():
    assert_exit(case("rdtsc", RDTSC_EXITING), RDTSC, length=2)     # 0F 31


def test_rdtsc_without_rdtsc_exiting_executes():
    r = case("rdtsc")
    assert_no_exit(r)
    assert r.steps == 2                       # RDTSC, then the HLT after the code


def test_pause_exits_with_pause_exiting():
    assert_exit(case("pause", PAUSE_EXITING), PAUSE, length=2)     # F3 90


def test_pause_without_pause_exiting_executes():
    assert_no_exit(case("pause"))


# --------------------------------------------------------------------------- RDMSR / WRMSR
def test_rdmsr_and_wrmsr_exit_without_msr_bitmaps():
    assert_exit(case("rdmsr", regs={"rcx": IA32_TSC}), MSR_READ, length=2)
    assert_exit(case("wrmsr", regs={"rcx": IA32_FS_BASE}), MSR_WRITE, length=2)


def test_msr_bitmap_bit_clear_lets_rdmsr_and_wrmsr_run():
    r = case("rdmsr", USE_MSR_BITMAPS, regs={"rcx": IA32_EFER})
    assert_no_exit(r)
    assert r.no_exit.regs["rax"] == 0xD00 and r.no_exit.regs["rdx"] == 0   # EFER = LME|LMA|NXE
    r = case("wrmsr\nrdmsr", USE_MSR_BITMAPS, regs={"rcx": IA32_FS_BASE, "rax": 0x1234, "rdx": 0x5})
    assert_no_exit(r)
    assert r.no_exit.regs["rax"] == 0x1234 and r.no_exit.regs["rdx"] == 0x5


def test_msr_bitmap_read_and_write_bits_are_separate():
    bm = {"read": [IA32_TSC], "write": [IA32_FS_BASE]}
    assert_exit(case("rdmsr", USE_MSR_BITMAPS, regs={"rcx": IA32_TSC}, msr_bitmap=bm), MSR_READ, length=2)
    assert_exit(case("wrmsr", USE_MSR_BITMAPS, regs={"rcx": IA32_FS_BASE}, msr_bitmap=bm),
                MSR_WRITE, length=2)
    # the write bit of FS_BASE does not intercept its reads, nor the read bit of TSC its writes
    assert_no_exit(case("rdmsr", USE_MSR_BITMAPS, regs={"rcx": IA32_FS_BASE}, msr_bitmap=bm))
    assert_no_exit(case("wrmsr", USE_MSR_BITMAPS, regs={"rcx": IA32_TSC}, msr_bitmap=bm))


def test_msr_bitmap_as_raw_bytes_high_range():
    # SDM layout: read bitmap for high MSRs at byte 1024, bit n for MSR 0xC0000000 + n
    raw = bytearray(4096)
    raw[1024 + 0x80 // 8] |= 1 << (0x80 % 8)             # RDMSR of IA32_EFER
    assert_exit(case("rdmsr", USE_MSR_BITMAPS, regs={"rcx": IA32_EFER}, msr_bitmap=bytes(raw)),
                MSR_READ, length=2)
    assert bytes(raw) == msr_bitmap(read=[IA32_EFER])
    raw = bytearray(4096)
    raw[3072 + 0x100 // 8] |= 1 << (0x100 % 8)           # WRMSR of IA32_FS_BASE
    assert bytes(raw) == msr_bitmap(write=[IA32_FS_BASE])


@pytest.mark.parametrize("msr", [0x2000, 0x4B564D00, 0xC0002000, 0xC0010000])
def test_msr_outside_the_bitmap_ranges_always_exits(msr):
    # an all-zero bitmap intercepts nothing in its ranges; these MSRs are outside them
    assert_exit(case("rdmsr", USE_MSR_BITMAPS, regs={"rcx": msr}), MSR_READ, length=2)
    assert_exit(case("wrmsr", USE_MSR_BITMAPS, regs={"rcx": msr}), MSR_WRITE, length=2)


# --------------------------------------------------------------------------- I/O
# Exit qualification for I/O instructions (SDM table): bits 2:0 size - 1, bit 3 direction
# (1 = IN), bit 4 string, bit 5 REP, bit 6 operand encoding (1 = immediate), 31:16 port.
def test_io_without_io_controls_does_not_exit():
    assert_no_exit(case("in al, 0x60\nout 0x80, al"))


def test_in_al_imm8_qualification():
    e = assert_exit(case("in al, 0x60", UNCOND_IO_EXITING), IO_INSTRUCTION, length=2,   # E4 60
                    qualification=0x0060_0000 | 0x40 | 0x08)
    assert e.name == "IO_INSTRUCTION"


def test_out_dx_ax_qualification():
    assert_exit(case("out dx, ax", UNCOND_IO_EXITING, regs={"rdx": 0x3F8}), IO_INSTRUCTION,
                length=2, qualification=0x03F8_0000 | 0x1)                              # 66 EF


def test_rep_outsb_qualification_and_instruction_information():
    r = case("rep outsb", UNCOND_IO_EXITING, regs={"rdx": 0x80, "rcx": 3, "rsi": SCRATCH_BASE})
    e = assert_exit(r, IO_INSTRUCTION, length=2, qualification=0x0080_0000 | 0x20 | 0x10)  # F3 6E
    # VM-exit instruction information for OUTS: bits 9:7 address size (2 = 64-bit),
    # bits 17:15 segment register (3 = DS); the other bits are undefined
    assert e.instruction_info & (0x7 << 7 | 0x7 << 15) == (2 << 7) | (3 << 15)
    # guest-linear address: the source operand DS:RSI
    assert e.guest_linear_address == SCRATCH_BASE


def test_rep_insd_with_df_set_qualification():
    r = case("std\nrep insd", UNCOND_IO_EXITING, regs={"rdx": 0x1F0, "rcx": 2, "rdi": SCRATCH_BASE})
    # IN, string, REP, 4 bytes (size - 1 = 3); the direction flag is not in the qualification
    assert_exit(r, IO_INSTRUCTION, length=2, qualification=0x01F0_0000 | 0x20 | 0x10 | 0x08 | 0x3,
                rip=CODE_BASE + 1)


def test_io_bitmap_a_bit_set_exits_and_clear_does_not():
    a = io_bitmaps([0x60])[0]
    assert_exit(case("in al, 0x60", USE_IO_BITMAPS, io_bitmap_a=a), IO_INSTRUCTION, length=2,
                qualification=0x0060_0048)
    assert_no_exit(case("in al, 0x61", USE_IO_BITMAPS, io_bitmap_a=a))


def test_io_bitmap_b_covers_ports_from_0x8000():
    assert_exit(case("in al, dx", USE_IO_BITMAPS, regs={"rdx": 0x8000}, io_bitmap_b=[0x8000]),
                IO_INSTRUCTION, length=1, qualification=0x8000_0000 | 0x08)              # EC
    assert_no_exit(case("in al, dx", USE_IO_BITMAPS, regs={"rdx": 0x8001}, io_bitmap_b=[0x8000]))
    # bit 0x8000 of bitmap B is bit 0 of its first byte
    raw = bytearray(4096)
    raw[0] = 1
    assert_exit(case("in al, dx", USE_IO_BITMAPS, regs={"rdx": 0x8000}, io_bitmap_b=bytes(raw)),
                IO_INSTRUCTION, length=1, qualification=0x8000_0008)


def test_multi_byte_access_exits_if_any_port_is_intercepted():
    # a 2-byte OUT at 0x7FFF touches 0x7FFF (bitmap A) and 0x8000 (bitmap B)
    assert_exit(case("out dx, ax", USE_IO_BITMAPS, regs={"rdx": 0x7FFF}, io_bitmap_b=[0x8000]),
                IO_INSTRUCTION, length=2, qualification=0x7FFF_0001)
    assert_no_exit(case("out dx, ax", USE_IO_BITMAPS, regs={"rdx": 0x7FFE}, io_bitmap_b=[0x8000]))
    # a 4-byte IN at 0x10 touches 0x10..0x13
    assert_exit(case("in eax, dx", USE_IO_BITMAPS, regs={"rdx": 0x10}, io_bitmap_a=[0x13]),
                IO_INSTRUCTION, length=1, qualification=0x0010_000B)


def test_io_access_wrapping_past_0xffff_exits_with_bitmaps():
    assert_exit(case("in eax, dx", USE_IO_BITMAPS, regs={"rdx": 0xFFFE}), IO_INSTRUCTION,
                length=1, qualification=0xFFFE_000B)


def test_io_bitmaps_take_precedence_over_unconditional_io_exiting():
    # "use I/O bitmaps" = 1: "unconditional I/O exiting" is ignored
    assert_no_exit(case("in al, 0x60", UNCOND_IO_EXITING | USE_IO_BITMAPS))


# --------------------------------------------------------------------------- control registers
# Exit qualification for control-register accesses: bits 3:0 CR number, 5:4 access type
# (0 MOV to CR, 1 MOV from CR, 2 CLTS, 3 LMSW), 11:8 GPR (0 RAX, 1 RCX, 2 RDX, 3 RBX, ...).
GUEST_CR0 = 0x80010033
CR0_TS = 1 << 3


def test_mov_to_cr0_exits_when_a_masked_bit_differs_from_the_shadow():
    r = run_case("mov rbx, cr0\nor rbx, 8\nw: mov cr0, rbx",
                 vmcs={"CR0_GUEST_HOST_MASK": CR0_TS, "CR0_READ_SHADOW": GUEST_CR0})
    assert_exit(r, CR_ACCESS, length=3, qualification=0x300, rip=r.symbols["w"])       # 0F 22 C3


def test_mov_to_cr0_does_not_exit_when_masked_bits_match_the_shadow():
    # the shadow says TS=1: writing TS=1 does not exit; the host owns TS, so the real CR0.TS
    # stays 0, and a MOV from CR0 reads the shadow's TS
    r = run_case("mov rbx, cr0\nor rbx, 8\nmov cr0, rbx\nmov rax, cr0",
                 vmcs={"CR0_GUEST_HOST_MASK": CR0_TS, "CR0_READ_SHADOW": GUEST_CR0 | CR0_TS})
    n = assert_no_exit(r)
    assert n.regs["rax"] == GUEST_CR0 | CR0_TS
    assert n.regs["cr0"] == GUEST_CR0


def test_mov_to_cr0_changing_only_guest_owned_bits_does_not_exit():
    # mask = TS only; clearing MP (bit 1) changes a guest-owned bit
    r = run_case("mov rbx, cr0\nand rbx, -3\nmov cr0, rbx",
                 vmcs={"CR0_GUEST_HOST_MASK": CR0_TS, "CR0_READ_SHADOW": GUEST_CR0})
    n = assert_no_exit(r)
    assert n.regs["cr0"] == GUEST_CR0 & ~2


def test_mov_to_cr3_with_cr3_load_exiting():
    r = case("mov cr3, rcx", CR3_LOAD_EXITING, regs={"rcx": 0x20000})
    assert_exit(r, CR_ACCESS, length=3, qualification=0x103)                           # 0F 22 D9


def test_mov_to_cr3_matching_a_cr3_target_value_does_not_exit():
    targets = {"CR3_TARGET_COUNT": 1, "CR3_TARGET_VALUE0": 0x20000}
    assert_no_exit(case("mov cr3, rcx", CR3_LOAD_EXITING, regs={"rcx": 0x20000}, vmcs=targets))
    other = {"CR3_TARGET_COUNT": 1, "CR3_TARGET_VALUE0": 0x21000}
    assert_exit(case("mov cr3, rcx", CR3_LOAD_EXITING, regs={"rcx": 0x20000}, vmcs=other),
                CR_ACCESS, length=3, qualification=0x103)
    # a target value beyond CR3_TARGET_COUNT is not consulted
    unused = {"CR3_TARGET_COUNT": 0, "CR3_TARGET_VALUE0": 0x20000}
    assert_exit(case("mov cr3, rcx", CR3_LOAD_EXITING, regs={"rcx": 0x20000}, vmcs=unused),
                CR_ACCESS, length=3, qualification=0x103)


def test_mov_to_cr3_without_cr3_load_exiting():
    assert_no_exit(case("mov cr3, rcx", regs={"rcx": 0x20000}))


def test_mov_from_cr8_with_cr8_store_exiting():
    # CR8, MOV from CR (1), RDX (2); 44 0F 20 C2
    assert_exit(case("mov rdx, cr8", CR8_STORE_EXITING), CR_ACCESS, length=4, qualification=0x218)
    assert_no_exit(case("mov rdx, cr8"))


# --------------------------------------------------------------------------- INVLPG
def test_invlpg_with_invlpg_exiting_reports_the_linear_address():
    la = SCRATCH_BASE + 0x123
    assert_exit(case("invlpg [rax]", INVLPG_EXITING, regs={"rax": la}), INVLPG, length=3,   # 0F 01 38
                qualification=la)
    assert_exit(case("invlpg [rax + 0x10]", INVLPG_EXITING, regs={"rax": la}), INVLPG, length=4,
                qualification=la + 0x10)
    assert_no_exit(case("invlpg [rax]", regs={"rax": la}))


# --------------------------------------------------------------------------- exceptions
def test_ud2_with_ud_in_the_exception_bitmap():
    r = run_case("ud2", vmcs={"EXCEPTION_BITMAP": 1 << UD})
    e = assert_exit(r, EXCEPTION_NMI)
    assert e.interruption_info == 0x80000306       # valid, hardware exception, vector 6
    assert e.error_code is None                    # #UD has no error code
    assert e.instruction_length is None            # undefined for a hardware exception


def test_ud2_without_ud_in_the_bitmap_is_delivered_and_ends_in_a_triple_fault():
    # every IDT gate of the fresh state is zero (an invalid gate type): #UD -> #GP -> #DF -> triple
    assert_exit(run_case("ud2", vmcs={"EXCEPTION_BITMAP": 1 << PF}), TRIPLE_FAULT)


def test_gp_with_error_code():
    # loading DS with selector 0x50, beyond the GDT limit: #GP(0x50)
    r = run_case("mov ax, 0x50\nl: mov ds, ax", vmcs={"EXCEPTION_BITMAP": 1 << GP})
    e = assert_exit(r, EXCEPTION_NMI, rip=r.symbols["l"])
    assert e.interruption_info == 0x80000B0D       # valid, error code valid, hw exception, 13
    assert e.error_code == 0x50


def test_gp_while_delivering_ud_through_an_invalid_gate():
    # the #GP that delivery of #UD raises: error code = vector * 8 + IDT (2) + EXT (1)
    e = assert_exit(run_case("ud2", vmcs={"EXCEPTION_BITMAP": 1 << GP}), EXCEPTION_NMI)
    assert e.interruption_info == 0x80000B0D and e.error_code == 6 * 8 + 2 + 1


def test_idt_vectoring_information_of_an_exit_during_event_delivery():
    # SDM: an exit during delivery of #UD records the #UD in the IDT-vectoring information
    e = assert_exit(run_case("ud2", vmcs={"EXCEPTION_BITMAP": 1 << GP}), EXCEPTION_NMI)
    assert e.idt_vectoring_info == 0x80000306


def test_pf_exits_with_mask_and_match_zero():
    r = run_case("mov rax, [rbx]", regs={"rbx": UNMAPPED}, vmcs={"EXCEPTION_BITMAP": 1 << PF})
    e = assert_exit(r, EXCEPTION_NMI, qualification=UNMAPPED)     # #PF: the linear address
    assert e.interruption_info == 0x80000B0E
    assert e.error_code == 0                       # not present, read, supervisor


def test_pf_that_exits_does_not_update_cr2():
    # SDM "Architectural State Before a VM Exit": a page fault that causes a VM exit
    # directly does not update CR2
    r = run_case("mov rax, [rbx]", regs={"rbx": UNMAPPED, "cr2": 0x1234},
                 vmcs={"EXCEPTION_BITMAP": 1 << PF})
    assert assert_exit(r, EXCEPTION_NMI, qualification=UNMAPPED).regs["cr2"] == 0x1234


WRITE_PF = "mov [rbx], rax"        # PFEC 2: not present, write
READ_PF = "mov rax, [rbx]"         # PFEC 0


@pytest.mark.parametrize("bit14, code, exits", [
    # PFEC & MASK == MATCH: bit 14 decides; otherwise its meaning is reversed (MASK = MATCH = 2)
    (1, WRITE_PF, True), (1, READ_PF, False), (0, WRITE_PF, False), (0, READ_PF, True)])
def test_pf_error_code_mask_and_match(bit14, code, exits):
    # #DF in the bitmap: a #PF that does not exit is delivered, meets the invalid gate and
    # becomes a #DF (a #PF then a contributory #GP), which exits
    vmcs = {"EXCEPTION_BITMAP": bit14 << PF | 1 << DF,
            "PAGE_FAULT_ERROR_CODE_MASK": 2, "PAGE_FAULT_ERROR_CODE_MATCH": 2}
    e = assert_exit(run_case(code, regs={"rbx": UNMAPPED}, vmcs=vmcs), EXCEPTION_NMI,
                    qualification=UNMAPPED if exits else 0)
    if exits:
        assert e.interruption_info == 0x80000B0E
        assert e.error_code == (2 if code == WRITE_PF else 0)
    else:
        assert e.interruption_info == 0x80000B08 and e.error_code == 0


def test_int3_in_the_bitmap_is_a_software_exception_with_a_length():
    e = assert_exit(run_case("int3", vmcs={"EXCEPTION_BITMAP": 1 << 3}), EXCEPTION_NMI)
    assert e.interruption_info == 0x80000603       # valid, software exception (6), vector 3
    assert e.instruction_length == 1               # CC


# --------------------------------------------------------------------------- windows
def test_interrupt_window_exit_before_the_first_instruction_when_if_is_set():
    r = case("nop", INTR_WINDOW, regs={"rflags": 0x202})
    assert_exit(r, INTERRUPT_WINDOW)
    assert r.steps == 0


def test_interrupt_window_waits_for_the_sti_shadow():
    r = case("sti\nnop\nafter: nop", INTR_WINDOW)
    assert_exit(r, INTERRUPT_WINDOW, rip=r.symbols["after"])
    assert r.steps == 2


# --------------------------------------------------------------------------- VM-entry failures
def test_control_bit_that_must_be_1_left_0_is_vmfail_valid_7():
    r = run_case("hlt", vmcs={PROC: HLT_EXITING})       # legal=False: used as given
    assert r.outcome == "entry_failure" and r.steps == 0
    f = r.entry_failure
    assert f.kind is FailureKind.VMFAIL_VALID and f.error == 7, str(f)


def test_vmfail_valid_writes_the_vm_instruction_error_field():
    # SDM "VMfailValid(ErrorNumber)": the error number goes into the current VMCS
    assert run_case("hlt", vmcs={PROC: HLT_EXITING}).vmcs["VM_INSTRUCTION_ERROR"] == 7


def test_legal_true_makes_the_control_legal():
    assert_exit(run_case("hlt", vmcs={PROC: HLT_EXITING}, legal=True), HLT, length=1)


def test_invalid_guest_cr0_is_an_entry_failure_exit_33():
    r = run_case("nop", vmcs={"GUEST_CR0": GUEST_CR0 & ~(1 << 5)})    # CR0.NE is fixed to 1
    f = r.entry_failure
    assert f.kind is FailureKind.ENTRY_FAILURE_EXIT, str(f)
    assert f.exit_reason == 0x80000021 and f.qualification == 0
    assert r.vmcs["VM_EXIT_REASON"] == 0x80000021
    assert r.steps == 0


# --------------------------------------------------------------------------- the API itself
def test_default_controls_are_the_default1_bits_plus_64_bit_guest_and_host():
    # SDM Appendix A: default1 bits in the TRUE classes; VM-exit bit 9 host address-space
    # size, VM-entry bit 9 IA-32e mode guest
    assert DEFAULT_CONTROLS == {
        "PIN_BASED_VM_EXEC_CONTROL": 0x16,
        "CPU_BASED_VM_EXEC_CONTROL": 0x0400_6172,
        "SECONDARY_VM_EXEC_CONTROL": 0,
        "VM_EXIT_CONTROLS": 0x0003_6DFB | 1 << 9,
        "VM_ENTRY_CONTROLS": 0x0000_11FB | 1 << 9,
    }


def test_fresh_state_at_the_first_exit():
    e = assert_exit(run_case("cpuid"), CPUID)
    assert e.regs["rsp"] == 0x9F000 and e.regs["rflags"] == 0x2
    assert e.regs["cr0"] == GUEST_CR0 and e.regs["cr3"] == 0x20000
    assert e.regs["cr4"] == 0x20 | 1 << 13          # CR4.VMXE is 1 in VMX operation
    assert all(e.regs[r] == 0 for r in ("rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r15"))


def test_each_case_starts_from_the_fresh_state():
    run_case("mov rbx, 5\nmov rsp, 0x1000\npushfq\nstd\nmov cr3, rax\nud2",
             regs={"rax": 0x20000}, vmcs={"EXCEPTION_BITMAP": 1 << UD})
    e = assert_exit(run_case("cpuid"), CPUID)
    assert e.regs["rbx"] == 0 and e.regs["rsp"] == 0x9F000 and e.regs["rflags"] == 0x2


def test_regs_set_rip_and_gprs():
    r = run_case("nop\ncpuid", regs={"rip": CODE_BASE + 1, "r12": 0xDEAD})
    e = assert_exit(r, CPUID, rip=CODE_BASE + 1)
    assert e.regs["r12"] == 0xDEAD and r.steps == 0


def test_bytes_as_code():
    assert_exit(run_case(bytes.fromhex("90 0fa2")), CPUID, length=2, rip=CODE_BASE + 1)


def interrupt_gate(handler):
    """A 64-bit interrupt gate (SDM "64-Bit IDT Gate Descriptors"): selector 0x08, type 0xE, P."""
    lo = (handler & 0xFFFF) | 0x08 << 16 | 0xE << 40 | 1 << 47 | ((handler >> 16) & 0xFFFF) << 48
    return (lo | (handler >> 32) << 64).to_bytes(16, "little")


IDT_BASE = 0x12000          # the fresh state's IDTR base


def test_memory_installs_an_idt_gate_and_the_exception_is_delivered_without_exit():
    # loading DS with 0x50 raises #GP(0x50); the handler pops the error code, then exits
    src = "mov ax, 0x50\nmov ds, ax\nud2\nhandler: pop rax\nexit: cpuid"
    sym = run_case(src).symbols
    r = run_case(src, memory={IDT_BASE + 16 * GP: interrupt_gate(sym["handler"])})
    e = assert_exit(r, CPUID, length=2, rip=sym["exit"])
    assert e.regs["rax"] == 0x50                # the #GP error code, pushed by delivery
    # the frame: error code, RIP, CS, RFLAGS, RSP, SS; the error code was popped
    assert e.regs["rsp"] == 0x9F000 - 5 * 8


def test_memory_outside_ram_or_over_the_vmcs_is_a_case_error():
    with pytest.raises(CaseError, match="outside"):
        run_case("nop", memory={(16 << 20) - 4: b"12345678"})
    with pytest.raises(CaseError, match="overlaps"):
        run_case("nop", memory={0xF00000: b"x"})


def test_step_limit():
    r = run_case("spin: jmp spin", max_steps=500)
    n = assert_no_exit(r, "step limit")
    assert r.steps == 500 and n.guest_rip == CODE_BASE


def test_write_to_the_test_exit_port_without_io_exiting_stops_the_run():
    n = assert_no_exit(run_case("out 0xf4, al"), "stopped")
    assert "exit port" in n.message


def test_legal_controls_helper():
    got = legal_controls({PROC: HLT_EXITING, "EXCEPTION_BITMAP": 0xFFFF})
    assert got == {PROC: 0x0400_6172 | HLT_EXITING, "EXCEPTION_BITMAP": 0xFFFF}


@pytest.mark.parametrize("kwargs, words", [
    ({"vmcs": {"NO_SUCH_FIELD": 1}}, "NO_SUCH_FIELD"),
    ({"vmcs": {"PIN_BASED_VM_EXEC_CONTROL": 1 << 32}}, "does not fit"),
    ({"vmcs": {"EXIT_QUALIFICATION": 0}}, "read-only"),
    ({"vmcs": {"GUEST_RIP": -1}}, "negative"),
    ({"vmcs": {"GUEST_RIP": CODE_BASE}, "regs": {"rip": CODE_BASE}}, "both"),
    ({"regs": {"eax": 1}}, "unknown register"),
    ({"regs": {"rax": 1 << 64}}, "64 bits"),
    ({"msr_bitmap": b"\0" * 100}, "4096"),
    ({"msr_bitmap": {"reads": [1]}}, "keys"),
    ({"msr_bitmap": {"read": [0x40000000]}}, "outside"),
    ({"io_bitmap_a": [0x8000]}, "range"),
    ({"max_steps": 0}, "max_steps"),
])
def test_bad_input_is_a_case_error(kwargs, words):
    with pytest.raises(CaseError, match=words):
        run_case("nop", **kwargs)


def test_code_that_does_not_assemble_is_a_case_error():
    with pytest.raises(CaseError, match="does not assemble"):
        run_case("mov rax, nosuchregister")
    with pytest.raises(CaseError, match="empty"):
        run_case(b"")


# --------------------------------------------------------------------------- MTF and the preemption timer
MONITOR_TRAP_FLAG_EXIT, PREEMPTION_TIMER_EXIT = 37, 52
MONITOR_TRAP_FLAG = 1 << 27           # primary processor-based control
PIN = "PIN_BASED_VM_EXEC_CONTROL"
PREEMPTION_TIMER = 1 << 6             # pin-based control
EXIT_CONTROLS = "VM_EXIT_CONTROLS"
SAVE_PREEMPTION_TIMER = 1 << 22       # VM-exit control
HOST_ADDR_SPACE_SIZE = 1 << 9         # VM-exit control (the host is 64-bit)


def test_monitor_trap_flag_exits_after_one_instruction():
    # SDM "Monitor Trap Flag": an MTF VM exit occurs on the boundary after the first
    # instruction in VMX non-root operation completes (here a 2-byte xor)
    r = case("xor eax, eax\nxor ebx, ebx", MONITOR_TRAP_FLAG)
    e = assert_exit(r, MONITOR_TRAP_FLAG_EXIT, rip=CODE_BASE + 2)
    assert r.steps == 1
    assert e.instruction_length is None          # undefined for MTF exits


def test_no_mtf_exit_without_the_control():
    assert_no_exit(case("xor eax, eax\nxor ebx, ebx"))


def test_preemption_timer_zero_exits_before_the_first_instruction():
    # SDM "VMX-Preemption Timer": with a value of 0 at VM entry, the exit occurs before
    # any instruction executes
    r = run_case("xor eax, eax", vmcs={PIN: PREEMPTION_TIMER, "VMX_PREEMPTION_TIMER_VALUE": 0},
                 legal=True)
    assert_exit(r, PREEMPTION_TIMER_EXIT, rip=CODE_BASE)
    assert r.steps == 0


def test_preemption_timer_counts_at_the_tsc_rate_shifted_by_misc():
    # IA32_VMX_MISC[4:0] = 5: the timer decrements every 32 TSC ticks (here 1 tick per
    # instruction), so a value of 10 expires after 320 instructions of a nop loop,
    # and VM_EXIT_SAVE_VMX_PREEMPTION_TIMER stores the value 0
    loop = "1:  nop\n    jmp 1b"
    r = run_case(loop, vmcs={PIN: PREEMPTION_TIMER, "VMX_PREEMPTION_TIMER_VALUE": 10,
                             EXIT_CONTROLS: SAVE_PREEMPTION_TIMER | HOST_ADDR_SPACE_SIZE},
                 legal=True)
    assert r.outcome == "exit" and r.exit.reason == PREEMPTION_TIMER_EXIT, str(r)
    assert r.steps == 320
    assert r.vmcs["VMX_PREEMPTION_TIMER_VALUE"] == 0


def test_code_that_stores_into_itself_executes_as_on_hardware():
    # zero bytes decode as "add [rax], al"; with RAX pointing at them each
    # instruction stores into its own bytes.  SDM Vol. 3A "Self-Modifying Code":
    # the store lands and the next instruction is fetched (here AL = 0: no change)
    r = run_case("mov eax, 0x400000\njmp rax", max_steps=3, memory={0x400000: bytes(16)})
    assert r.exit is None
    assert r.no_exit.why == "step limit", r
    assert r.no_exit.guest_rip == 0x400002
    assert r.steps == 3


def test_a_vm_exit_saves_efer_lma_into_the_ia32e_mode_guest_control():
    # SDM "Saving Control Registers, Debug Registers, and MSRs": a VM exit stores
    # EFER.LMA into the "IA-32e mode guest" VM-entry control (bit 9).  The guest (CR0
    # all guest-owned, unrestricted guest, which needs EPT) leaves IA-32e mode by
    # itself: a far return to 32-bit code (compatibility mode), then MOV to CR0 with
    # PG clear, which does not exit; CPUID then exits with LMA 0.
    code32 = 0x00CF9B000000FFFF          # flat 32-bit code segment, DPL 0, at selector 0x38
    r = run_case("""
        push 0x38
        lea rax, [rip + compat]
        push rax
        retfq
    compat:
        .code32
        mov eax, cr0
        and eax, 0x7FFFFFFF
        mov cr0, eax
        cpuid
    """, vmcs={"GUEST_GDTR_LIMIT": 0x3F,
               "CPU_BASED_VM_EXEC_CONTROL": 1 << 31,                 # activate secondary controls
               "SECONDARY_VM_EXEC_CONTROL": (1 << 1) | (1 << 7)},    # enable EPT, unrestricted guest
        memory={LM.GDT + 0x38: struct.pack("<Q", code32)}, ept="identity", legal=True)
    assert r.exit is not None and r.exit.name == "CPUID", r
    assert not r.vmcs["GUEST_IA32_EFER"] & (1 << 10)           # LMA 0: out of IA-32e mode
    assert not r.vmcs["VM_ENTRY_CONTROLS"] & (1 << 9)          # ... and the control says so
