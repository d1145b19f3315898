"""EPT at run time: real guest instructions under a VMCS that enables EPT.

Every expectation is written here from the Intel SDM Vol. 3C as literals:
exit reasons 48 (EPT violation) and 49 (EPT misconfiguration) (Appendix C);
the exit qualification from the table "Exit Qualification for EPT
Violations" (bit 0 data read, bit 1 data write, bit 2 instruction fetch,
bits 3/4/5 the AND of the R/W/X bits of the EPT entries used, bit 7 the
guest-linear-address field is valid, bit 8 the access is to the translation
of that linear address (clear: to one of the guest's paging-structure
entries), bit 12 NMI unblocking due to IRET); section "EPT Violations"
(guest paging-structure reads are data reads; with EPTP bit 6 they are
treated as writes; updates of the guest's accessed/dirty flags are data
writes); "Accessed and Dirty Flags for EPT" (bit 8 accessed, bit 9 dirty of
the EPT entries); the #PF error code of chapter "Paging" (bit 0 P, 1 W/R,
2 U/S, 3 RSVD, 4 I/D); "Guest-physical address" and "Guest-linear address"
in "Basic VM-Exit Information".  EPT violations and misconfigurations are
fault-like: the instruction has not executed and GUEST_RIP is its address.

The guest runs from the fresh 64-bit state of devirt_emu.testing.vmx_case:
identity paging with 2 MiB guest pages (PML4 0x20000, PDPT 0x21000, PD
0x22000), stack top 0x9F000, code at 0x100000, scratch from 0x400000.
"""
import struct

import pytest

from devirt_emu.testing.vmx_case import (CODE_BASE, EPT_POOL, SCRATCH_BASE, CaseError, CaseRunner,
                                         EptEntry, EptMap, run_case)
from devirt_emu.vmx.fields import VmcsField as F

EPT_VIOLATION, EPT_MISCONFIG, EXCEPTION_NMI, CPUID = 48, 49, 0, 10
# exit qualification for EPT violations
Q_READ, Q_WRITE, Q_FETCH = 1 << 0, 1 << 1, 1 << 2
Q_R, Q_W, Q_X = 1 << 3, 1 << 4, 1 << 5
Q_GLA, Q_TRANSLATION = 1 << 7, 1 << 8
Q_NMI_UNBLOCK = 1 << 12
# EPT entry rights and flags
R, W, X = 1, 2, 4
EPT_A, EPT_D = 1 << 8, 1 << 9
# guest paging-structure entry flags (chapter "Paging")
P_A, P_D = 1 << 5, 1 << 6

PML4, PDPT, PD = 0x20000, 0x21000, 0x22000
STACK_TOP = 0x9F000
IDT = 0x12000
PAGE = 0x1000
PF, UD = 14, 6
PIN = "PIN_BASED_VM_EXEC_CONTROL"


def identity_except(*pages):
    """Identity EPT over the case's RAM, with (gpa, rights[, hpa]) overrides."""
    out = {}
    for gpa, rights, *hpa in pages:
        out[gpa] = (hpa[0] if hpa else gpa, rights)
    return ["identity", out]


def ept_exit(r, reason, *, rip=CODE_BASE):
    assert r.outcome == "exit", str(r)
    e = r.exit
    assert e.reason == reason and e.exit_reason == reason, str(r)
    assert e.guest_rip == rip, str(r)
    return e


def interrupt_gate(handler):
    """A 64-bit interrupt gate (SDM "64-Bit IDT Gate Descriptors"): selector 0x08, type 0xE, P."""
    lo = (handler & 0xFFFF) | 0x08 << 16 | 0xE << 40 | 1 << 47 | ((handler >> 16) & 0xFFFF) << 48
    return (lo | (handler >> 32) << 64).to_bytes(16, "little")


# --- the identity EPT changes nothing ------------------------------------------------

def test_identity_ept_runs_the_guest_to_its_exit():
    r = run_case("mov rax, [rbx]\nmov qword ptr [rbx + 8], 7\nmov rcx, [rbx + 8]\nexit: cpuid",
                 regs={"rbx": SCRATCH_BASE}, memory={SCRATCH_BASE: (0x1122).to_bytes(8, "little")},
                 ept="identity")
    e = ept_exit(r, CPUID, rip=r.symbols["exit"])
    assert e.regs["rcx"] == 7 and r.steps == 3
    assert r.vmcs["SECONDARY_VM_EXEC_CONTROL"] & 2          # "enable EPT" set by ept=


def test_translation_goes_through_the_ept():
    # GPA 0x500000 is mapped to HPA 0x600000: the read sees what is there
    r = run_case("mov rax, [rbx]\nexit: cpuid", regs={"rbx": 0x500010},
                 memory={0x500010: (0xAAAA).to_bytes(8, "little"),
                         0x600010: (0xBBBB).to_bytes(8, "little")},
                 ept=identity_except((0x500000, R | W | X, 0x600000)))
    assert ept_exit(r, CPUID, rip=r.symbols["exit"]).regs["rax"] == 0xBBBB


# --- EPT violations on the final access ---------------------------------------------

@pytest.mark.parametrize("insn, access", [
    ("mov rax, [rbx]", Q_READ),
    ("mov [rbx], rax", Q_WRITE),
])
def test_data_access_to_an_unmapped_gpa(insn, access):
    gla = SCRATCH_BASE + 0x123
    r = run_case(f"{insn}\ncpuid", regs={"rbx": gla, "rax": 5},
                 ept=identity_except((SCRATCH_BASE, 0)))
    e = ept_exit(r, EPT_VIOLATION)
    # not present: rights bits 5:3 are 0; the linear address is valid and translates to it
    assert e.qualification == access | Q_GLA | Q_TRANSLATION
    assert e.guest_physical_address == gla and e.guest_linear_address == gla
    assert e.instruction_length is None and e.interruption_info == 0
    assert r.steps == 0                                       # fault-like


def test_fetch_from_an_unmapped_gpa():
    target = SCRATCH_BASE + 0x40
    r = run_case("mov eax, 1\njmp rbx", regs={"rbx": target}, ept=identity_except((SCRATCH_BASE, 0)))
    e = ept_exit(r, EPT_VIOLATION, rip=target)                # RIP at the fetch
    assert e.qualification == Q_FETCH | Q_GLA | Q_TRANSLATION
    assert e.guest_physical_address == target == e.guest_linear_address
    assert e.regs["rax"] == 1 and r.steps == 2                # mov and jmp retired


def test_write_to_a_read_only_page_does_not_happen():
    gla = SCRATCH_BASE + 0x808
    r = run_case("mov qword ptr [rbx], 0x55\ncpuid", regs={"rbx": gla},
                 memory={gla: (0x77).to_bytes(8, "little")}, ept=identity_except((SCRATCH_BASE, R)))
    e = ept_exit(r, EPT_VIOLATION)
    assert e.qualification == Q_WRITE | Q_R | Q_GLA | Q_TRANSLATION
    assert e.guest_physical_address == gla == e.guest_linear_address
    runner_mem = struct.unpack("<Q", _read(gla, 8))[0]
    assert runner_mem == 0x77                                 # the store did not happen


def _read(pa, n):
    from devirt_emu.testing import vmx_case
    return vmx_case._runner.machine.mem.read(pa, n)


def test_push_onto_a_read_only_stack_leaves_rsp():
    r = run_case("push rax\ncpuid", ept=identity_except((STACK_TOP - PAGE, R | X)))
    e = ept_exit(r, EPT_VIOLATION)
    assert e.qualification == Q_WRITE | Q_R | Q_X | Q_GLA | Q_TRANSLATION
    assert e.guest_physical_address == STACK_TOP - 8
    assert e.regs["rsp"] == STACK_TOP                         # PUSH did not execute


def test_fetch_from_a_non_executable_page():
    target = SCRATCH_BASE + 0x10
    r = run_case("jmp rbx", regs={"rbx": target}, memory={target: b"\x90\x0f\xa2"},
                 ept=identity_except((SCRATCH_BASE, R | W)))
    e = ept_exit(r, EPT_VIOLATION, rip=target)
    assert e.qualification == Q_FETCH | Q_R | Q_W | Q_GLA | Q_TRANSLATION
    assert e.guest_physical_address == target


def test_fetch_straddling_into_a_non_executable_page_reports_the_straddling_instruction():
    # "mov rax, imm64" (10 bytes) starts 4 bytes before a page whose EPT entry is RW:
    # the instructions before it execute, the exit is at it, the GLA is the next page
    page = CODE_BASE + PAGE
    pad = PAGE - 4 - 5 - 2            # up to 4 bytes before the page: mov ecx, imm32 + nops
    code = b"\xb9\x01\x00\x00\x00" + b"\x90" * (pad + 2) + b"\x48\xb8" + bytes(range(1, 9)) + b"\x0f\xa2"
    assert len(code) == PAGE - 4 + 12
    r = run_case(code, ept=identity_except((page, R | W)))
    e = ept_exit(r, EPT_VIOLATION, rip=page - 4)
    assert e.qualification == Q_FETCH | Q_R | Q_W | Q_GLA | Q_TRANSLATION
    assert e.guest_linear_address == page == e.guest_physical_address
    assert e.regs["rcx"] == 1 and r.steps == 1 + pad + 2


def test_two_mib_ept_page():
    # GPA 0x400000-0x5FFFFF -> HPA 0xA00000 with one 2 MiB leaf, read/execute only
    big = EptMap(SCRATCH_BASE, 0xA00000, size=2 << 20, rights=R | X, page_size=2 << 20)
    r = run_case("mov rax, [rbx]\nw: mov [rbx + 0x1000], rax\ncpuid", regs={"rbx": SCRATCH_BASE + 0x1F8},
                 memory={0xA001F8: (0xC0FFEE).to_bytes(8, "little")}, ept=["identity", big])
    e = ept_exit(r, EPT_VIOLATION, rip=r.symbols["w"])
    assert e.regs["rax"] == 0xC0FFEE                          # read through the 2 MiB page
    assert e.qualification == Q_WRITE | Q_R | Q_X | Q_GLA | Q_TRANSLATION
    assert e.guest_physical_address == SCRATCH_BASE + 0x11F8


def test_one_gib_ept_page():
    # the guest maps linear 1 GiB with a 1 GiB page to GPA 1 GiB (its PDPTE 1); the EPT
    # maps GPA 1 GiB to HPA 0 with a 1 GiB leaf, read-only
    guest_pdpte = 0x4000_0000 | 0x83                          # P, R/W, PS
    giant = EptMap(0x4000_0000, 0, size=1 << 30, rights=R, page_size=1 << 30)
    gla = 0x4000_0000 + SCRATCH_BASE + 0x20
    r = run_case("mov rax, [rbx]\nw: mov [rbx], rax\ncpuid", regs={"rbx": gla},
                 memory={PDPT + 8: guest_pdpte.to_bytes(8, "little"),
                         SCRATCH_BASE + 0x20: (0xFACE).to_bytes(8, "little")},
                 ept=["identity", giant])
    e = ept_exit(r, EPT_VIOLATION, rip=r.symbols["w"])
    assert e.regs["rax"] == 0xFACE
    assert e.qualification == Q_WRITE | Q_R | Q_GLA | Q_TRANSLATION
    assert e.guest_physical_address == gla and e.guest_linear_address == gla


# --- accesses to the guest's own paging structures ----------------------------------

GLA_1G = 0x4000_0000 + 0x1234           # translated through the guest's PDPTE 1 -> a PD of its own
GUEST_PD_1G = 0x500000                  # that PD (guest-physical)


def guest_pd_at_1g():
    """Guest page tables: PDPTE 1 -> PD at 0x500000, whose entry 0 maps a 2 MiB page at 0x600000."""
    return {PDPT + 8: (GUEST_PD_1G | 0x3).to_bytes(8, "little"),
            GUEST_PD_1G: (0x600000 | 0x83).to_bytes(8, "little")}


def test_guest_paging_structure_not_in_the_ept():
    r = run_case("mov rax, [rbx]\ncpuid", regs={"rbx": GLA_1G}, memory=guest_pd_at_1g(),
                 ept=identity_except((GUEST_PD_1G, 0)))
    e = ept_exit(r, EPT_VIOLATION)
    # a read of a paging-structure entry: bit 0, GLA valid, bit 8 clear; GPA = the PDE
    assert e.qualification == Q_READ | Q_GLA
    assert e.guest_physical_address == GUEST_PD_1G + 0       # PD index 0
    assert e.guest_linear_address == GLA_1G


def test_guest_paging_structure_read_only_without_ept_ad_needs_write_for_the_accessed_flag():
    # reading the PDE is allowed; setting its accessed flag is a locked read-modify-write of
    # the entry: a violation reporting data read and data write (bits 0 and 1), as
    # kvm-unit-tests' ept_access_test_paddr_read_only_ad_disabled expects on hardware (issue 14)
    r = run_case("mov rax, [rbx]\ncpuid", regs={"rbx": GLA_1G}, memory=guest_pd_at_1g(),
                 ept=identity_except((GUEST_PD_1G, R)))
    e = ept_exit(r, EPT_VIOLATION)
    assert e.qualification == Q_READ | Q_WRITE | Q_R | Q_GLA
    assert e.guest_physical_address == GUEST_PD_1G


def test_guest_paging_structure_read_only_with_accessed_flag_already_set_is_enough():
    mem = guest_pd_at_1g()
    mem[GUEST_PD_1G] = (0x600000 | 0x83 | P_A).to_bytes(8, "little")
    mem[0x600000 + 0x1234] = (0x5151).to_bytes(8, "little")
    r = run_case("mov rax, [rbx]\nexit: cpuid", regs={"rbx": GLA_1G}, memory=mem,
                 ept=identity_except((GUEST_PD_1G, R)))
    assert ept_exit(r, CPUID, rip=r.symbols["exit"]).regs["rax"] == 0x5151


def test_guest_paging_structure_read_only_with_ept_ad_is_a_write():
    # EPTP bit 6: paging-structure accesses are treated as writes (bits 0 and 1 reported)
    mem = guest_pd_at_1g()
    mem[GUEST_PD_1G] = (0x600000 | 0x83 | P_A).to_bytes(8, "little")
    r = run_case("mov rax, [rbx]\ncpuid", regs={"rbx": GLA_1G}, memory=mem,
                 ept=identity_except((GUEST_PD_1G, R)), ept_ad=True)
    e = ept_exit(r, EPT_VIOLATION)
    assert e.qualification == Q_READ | Q_WRITE | Q_R | Q_GLA
    assert e.guest_physical_address == GUEST_PD_1G


def test_guest_accessed_and_dirty_flags_are_set_by_the_walk():
    runner = CaseRunner()
    r = runner.run("mov rax, [rbx]\nmov [rcx], rax\nexit: cpuid",
                   regs={"rbx": SCRATCH_BASE, "rcx": 0x600000}, ept="identity")
    ept_exit(r, CPUID, rip=r.symbols["exit"])
    mem = runner.machine.mem
    pde = lambda i: mem.read_u64(PD + 8 * i)
    assert pde(2) & (P_A | P_D) == P_A             # 0x400000: read only
    assert pde(3) & (P_A | P_D) == P_A | P_D       # 0x600000: written
    assert pde(4) & (P_A | P_D) == 0               # 0x800000: not used
    assert mem.read_u64(PML4) & P_A and mem.read_u64(PDPT) & P_A


# --- EPT accessed and dirty flags ----------------------------------------------------

def test_ept_accessed_and_dirty_flags():
    runner = CaseRunner()
    r = runner.run("mov rax, [rbx]\nmov [rcx], rax\nexit: cpuid",
                   regs={"rbx": SCRATCH_BASE, "rcx": SCRATCH_BASE + 0x2000},
                   ept="identity", ept_ad=True)
    ept_exit(r, CPUID, rip=r.symbols["exit"])
    assert r.vmcs["EPT_POINTER"] & (1 << 6)
    pte = lambda gpa: runner.ept.mem.read_u64(runner.ept.entry_address(gpa, 1))
    assert pte(SCRATCH_BASE) & (EPT_A | EPT_D) == EPT_A            # read
    assert pte(SCRATCH_BASE + 0x2000) & (EPT_A | EPT_D) == EPT_A | EPT_D   # written
    assert pte(SCRATCH_BASE + 0x1000) & (EPT_A | EPT_D) == 0       # untouched
    # guest paging structures are written (A/D with EPT A/D): accessed and dirty
    for gpa in (PML4, PDPT, PD):
        assert pte(gpa) & (EPT_A | EPT_D) == EPT_A | EPT_D, hex(gpa)
    # the non-leaf EPT entries used get their accessed flag
    assert runner.ept.mem.read_u64(runner.ept.entry_address(SCRATCH_BASE, 2)) & EPT_A


def test_no_ept_flags_without_eptp_bit_6():
    runner = CaseRunner()
    runner.run("mov [rcx], rax\ncpuid", regs={"rcx": SCRATCH_BASE}, ept="identity")
    pte = runner.ept.mem.read_u64(runner.ept.entry_address(SCRATCH_BASE, 1))
    assert pte & (EPT_A | EPT_D) == 0


# --- EPT misconfiguration ------------------------------------------------------------

@pytest.mark.parametrize("value", [
    SCRATCH_BASE | (2 << 3) | 7,          # memory type 2 (reserved) in a leaf
    SCRATCH_BASE | (6 << 3) | W,          # write without read
    SCRATCH_BASE | (6 << 3) | 7 | (1 << 50),   # a reserved bit above MAXPHYADDR
])
def test_misconfigured_leaf(value):
    gla = SCRATCH_BASE + 0x88
    r = run_case("mov rax, [rbx]\ncpuid", regs={"rbx": gla},
                 ept=["identity", EptEntry(SCRATCH_BASE, 1, value)])
    e = ept_exit(r, EPT_MISCONFIG)
    assert e.guest_physical_address == gla
    assert e.qualification == 0 and e.guest_linear_address is None
    assert r.steps == 0


def test_misconfigured_non_leaf_entry():
    # EPT PDE (non-leaf) with bits 2:0 = 110b (write/execute, no read)
    runner = CaseRunner()
    runner.run("nop", ept="identity")
    pt = runner.ept.mem.read_u64(runner.ept.entry_address(SCRATCH_BASE, 2)) & ~0xFFF
    r = runner.run("mov [rbx], rax\ncpuid", regs={"rbx": SCRATCH_BASE + 8},
                   ept=["identity", EptEntry(SCRATCH_BASE, 2, pt | W | X)])
    e = ept_exit(r, EPT_MISCONFIG)
    assert e.guest_physical_address == SCRATCH_BASE + 8


# --- guest page faults are not EPT exits ----------------------------------------------

def test_guest_page_fault_goes_to_the_exception_bitmap():
    unmapped = 0x4000_0000 + 0x10                 # PDPTE 1 not present in the guest's tables
    r = run_case("mov [rbx], rax\ncpuid", regs={"rbx": unmapped}, ept="identity",
                 vmcs={"EXCEPTION_BITMAP": 1 << PF})
    e = ept_exit(r, EXCEPTION_NMI)
    assert e.interruption_info == 0x80000B0E and e.error_code == 2   # not present, write
    assert e.qualification == unmapped


def test_guest_page_fault_is_delivered_through_the_guest_idt_with_cr2():
    src = ("mov rax, 0x1234\nmov byte ptr [rbx], 1\nud2\n"
           "handler: pop rcx\nmov rdx, cr2\nexit: cpuid")
    sym = run_case(src).symbols
    gla = 0x4000_0000 + 0x777
    r = run_case(src, regs={"rbx": gla}, ept="identity",
                 memory={IDT + 16 * PF: interrupt_gate(sym["handler"])})
    e = ept_exit(r, CPUID, rip=sym["exit"])
    assert e.regs["rcx"] == 2 and e.regs["rdx"] == gla       # error code (W/R), CR2


def test_guest_protection_fault_error_code():
    # a write to a page the guest maps read-only (PDE 2: P, PS, no R/W; CR0.WP = 1)
    src = "mov [rbx], rax\ncpuid"
    r = run_case(src, regs={"rbx": SCRATCH_BASE + 8}, ept="identity",
                 memory={PD + 16: (SCRATCH_BASE | 0x81).to_bytes(8, "little")},
                 vmcs={"EXCEPTION_BITMAP": 1 << PF})
    e = ept_exit(r, EXCEPTION_NMI)
    assert e.error_code == 3 and e.qualification == SCRATCH_BASE + 8   # P | W/R


def test_guest_reserved_bit_error_code():
    # PDE 2 with a reserved bit (bit 13 of a 2 MiB PDE): P | RSVD (| W/R for the write)
    r = run_case("mov rax, [rbx]\ncpuid", regs={"rbx": SCRATCH_BASE}, ept="identity",
                 memory={PD + 16: (SCRATCH_BASE | (1 << 13) | 0x83).to_bytes(8, "little")},
                 vmcs={"EXCEPTION_BITMAP": 1 << PF})
    assert ept_exit(r, EXCEPTION_NMI).error_code == 0x9


def test_invlpg_makes_a_changed_guest_mapping_visible():
    # the guest moves its 2 MiB page 0x400000 to GPA 0x600000 and invalidates it
    src = ("mov rax, [rbx]\nmov qword ptr [rdx], 0x600083\ninvlpg [rbx]\nmov rcx, [rbx]\nexit: cpuid")
    r = run_case(src, regs={"rbx": SCRATCH_BASE, "rdx": PD + 16}, ept="identity",
                 memory={SCRATCH_BASE: (1).to_bytes(8, "little"), 0x600000: (2).to_bytes(8, "little")})
    e = ept_exit(r, CPUID, rip=r.symbols["exit"])
    assert (e.regs["rax"], e.regs["rcx"]) == (1, 2)


# --- during event delivery ------------------------------------------------------------

def test_ept_violation_while_delivering_an_exception():
    # #UD's delivery pushes its frame on a stack page the EPT does not map
    src = "ud2\nhandler: cpuid"
    sym = run_case(src).symbols
    r = run_case(src, ept=identity_except((STACK_TOP - PAGE, 0)),
                 memory={IDT + 16 * UD: interrupt_gate(sym["handler"])})
    e = ept_exit(r, EPT_VIOLATION)                      # RIP still at UD2
    assert e.idt_vectoring_info == 0x80000306           # valid, hardware exception, #UD
    assert e.qualification == Q_WRITE | Q_GLA | Q_TRANSLATION
    assert STACK_TOP - 5 * 8 <= e.guest_physical_address < STACK_TOP


def test_ept_violation_while_delivering_an_injected_event():
    # VM entry injects external interrupt 0x40; its frame goes to an unmapped stack page
    r = run_case("cpuid", ept=identity_except((STACK_TOP - PAGE, 0)),
                 memory={IDT + 16 * 0x40: interrupt_gate(CODE_BASE)},
                 vmcs={"VM_ENTRY_INTR_INFO_FIELD": 0x80000040, "GUEST_RFLAGS": 0x202})
    e = ept_exit(r, EPT_VIOLATION)
    assert e.idt_vectoring_info == 0x80000040           # valid, external interrupt, vector 0x40
    assert r.vmcs["VM_ENTRY_INTR_INFO_FIELD"] & (1 << 31) == 0


@pytest.mark.parametrize("blocked", [True, False])
def test_iret_that_unblocks_nmis_sets_bit_12(blocked):
    # IRETQ pops its frame from a page the EPT does not map
    frame = SCRATCH_BASE + 0x100
    r = run_case("mov rsp, rbx\ni: iretq", regs={"rbx": frame},
                 ept=identity_except((SCRATCH_BASE, 0)),
                 vmcs={"GUEST_INTERRUPTIBILITY_INFO": 8 if blocked else 0})   # bit 3: NMI blocking
    e = ept_exit(r, EPT_VIOLATION, rip=r.symbols["i"])
    want = Q_READ | Q_GLA | Q_TRANSLATION | (Q_NMI_UNBLOCK if blocked else 0)
    assert e.qualification == want
    # the VM exit leaves NMI blocking cleared (SDM "Activities ... VM Exits")
    assert r.vmcs["GUEST_INTERRUPTIBILITY_INFO"] & 8 == 0


# --- the ept= shortcut -------------------------------------------------------------------

def test_ept_forms():
    # {gpa: (hpa, rights, page_size)}: a larger page replaces the smaller ones mapped there
    r = run_case("mov [rbx], rax\ncpuid", regs={"rbx": SCRATCH_BASE + 0x3000},
                 ept=["identity", {SCRATCH_BASE: (SCRATCH_BASE, R | X, 2 << 20)}])
    assert ept_exit(r, EPT_VIOLATION).qualification == Q_WRITE | Q_R | Q_X | Q_GLA | Q_TRANSLATION
    # a 4 KiB page inside an earlier 2 MiB one is an error
    with pytest.raises(CaseError, match="larger page"):
        run_case("nop", ept=[EptMap(0, 0, size=16 << 20, page_size=2 << 20),
                             {SCRATCH_BASE: (SCRATCH_BASE, 0)}])
    # one EptMap alone: the code page itself is mapped, nothing else (the first fetch's
    # walk reads the guest PML4E at 0x20000, which is not mapped)
    r = run_case("nop", ept=EptMap(CODE_BASE, CODE_BASE))
    e = ept_exit(r, EPT_VIOLATION)
    assert e.qualification == Q_READ | Q_GLA and e.guest_physical_address == PML4


@pytest.mark.parametrize("ept, match", [
    ("everything", "identity"),
    ({0: (0,)}, "hpa, rights"),
    ([EptMap(0x1001, 0)], "multiples"),
    ([EptMap(0, 0, page_size=4096 * 3)], "page_size"),
    ([EptEntry(SCRATCH_BASE, 1, 7)], "no EPT"),
    ([EptEntry(SCRATCH_BASE, 5, 7)], "level"),
    (42, "identity"),
])
def test_bad_ept_is_a_case_error(ept, match):
    with pytest.raises(CaseError, match=match):
        run_case("nop", ept=ept)


def test_ept_and_ept_pointer_together_is_a_case_error():
    with pytest.raises(CaseError, match="EPT_POINTER"):
        run_case("nop", ept="identity", vmcs={"EPT_POINTER": 0x1E})


def test_memory_over_the_ept_tables_is_a_case_error():
    with pytest.raises(CaseError, match="EPT tables"):
        run_case("nop", ept="identity", memory={EPT_POOL: b"x"})


def test_a_case_without_ept_after_one_with_runs_on_the_one_stage_walker():
    runner = CaseRunner()
    runner.run("mov rax, [rbx]\ncpuid", regs={"rbx": SCRATCH_BASE}, ept=identity_except((SCRATCH_BASE, 0)))
    r = runner.run("mov rax, [rbx]\ncpuid", regs={"rbx": SCRATCH_BASE})
    ept_exit(r, CPUID, rip=CODE_BASE + 3)
    assert runner.ept is None and not runner.core.vtlb.active


# --- the L0 (hypervisor/kvm.py): EPT built on demand --------------------------------------

GUEST_DIR = __import__("pathlib").Path(__file__).resolve().parent.parent / "guest_tests"


def _machine(config="stock", cores=1, guest="hello"):
    from devirt_emu.asm import build_image
    from devirt_emu.machine import Machine
    m = Machine(cores=cores, arch="vmx", config=config)
    m.load_image(build_image(GUEST_DIR / f"{guest}.S"))
    return m


def test_stock_guest_builds_its_ept_on_demand():
    from devirt_emu.vmx.ept import EptTranslation, ept_walk
    m = _machine()
    res = m.run()
    assert res.verdict == "pass", res.message
    # the first exit: the BSP's first fetch, in 32-bit protected mode with paging off (the
    # linear address is the guest-physical address: GLA valid, "translation" set)
    first = res.exits[0]
    assert (first["name"], first["qualification"], first["rip"]) == \
        ("EPT_VIOLATION", Q_FETCH | Q_GLA | Q_TRANSLATION, m.entry32)
    violations = [e for e in res.exits if e["name"] == "EPT_VIOLATION"]
    assert violations and all(e["reason"] == 48 for e in violations)
    for e in violations:
        # a guest access to a page with no EPT entry: bits 5:3 (rights) are 0 and the
        # guest-linear address is valid (no PDPTE loads: the firmware uses 4-level paging)
        assert e["qualification"] & (Q_R | Q_W | Q_X) == 0 and e["qualification"] & Q_GLA
    l0 = m.l0
    # what the guest touched is mapped now, identity (read the boot code page)
    r = ept_walk(m.mem.read, m.mem.write, l0.ept.eptp, 0x8000, 1)
    assert isinstance(r, EptTranslation) and r.hpa == 0x8000
    assert m.cores[0].vtlb is not None and m.cores[0].vtlb.active        # EPT on: two stages


def test_devirtualized_core_runs_on_the_one_stage_walker():
    m = _machine("devirt")
    res = m.run()
    assert res.verdict == "pass", res.message
    assert res.exit_counts.get("EPT_VIOLATION", 0) > 0         # boot ran under stock, with EPT
    assert not m.cores[0].vtlb.active                           # devirt: EPT off


def _l0_with_vcpu():
    m = _machine()
    m.l0.attach()
    return m, m.l0, m.l0.vcpus[0]


def _violation(gpa, qualification=Q_WRITE | Q_GLA | Q_TRANSLATION):
    from devirt_emu.vmx.rules import exit_decision
    return exit_decision("EPT_VIOLATION", ("test",), qualification=qualification,
                         guest_linear_address=gpa, guest_physical_address=gpa)


def _exit_with(vcpu, d):
    """Write exit ``d``'s information into the VMCS as the processor does (the
    IDT-vectoring fields the test stored stay), as the L0's handlers read it."""
    v = vcpu.vmcs
    v.store(F.VM_EXIT_REASON, d.reason)
    v.store(F.EXIT_QUALIFICATION, d.qualification)
    if d.guest_physical_address is not None:
        v.store(F.GUEST_PHYSICAL_ADDRESS, d.guest_physical_address)
    vcpu.last_exit = d
    return vcpu


@pytest.mark.parametrize("vectoring, reinjected", [
    (0x80000040, 0x80000040),              # external interrupt 0x40: injected again
    (0x80000B0E, 0x80000B0E),              # #PF with its error code
    (0x80000202, 0x80000202),              # NMI
    (0x80000480, 0),                       # INT 0x80 (software interrupt): not re-injected
    (0, 0),                                # not during event delivery
])
def test_l0_maps_the_page_and_reinjects_the_interrupted_event(vectoring, reinjected):
    from devirt_emu.vmx.ept import EptTranslation, ept_walk
    m, l0, vcpu = _l0_with_vcpu()
    v = vcpu.vmcs
    v.store(0x4408, vectoring)             # IDT_VECTORING_INFO_FIELD (read-only to VMWRITE)
    v.store(0x440A, 0x1234)                # IDT_VECTORING_ERROR_CODE
    gpa = 0x123456
    assert ept_walk(m.mem.read, m.mem.write, l0.ept.eptp, gpa, 2).__class__.__name__ == "EptViolation"
    l0.h_ept_violation(_exit_with(vcpu, _violation(gpa)))
    r = ept_walk(m.mem.read, m.mem.write, l0.ept.eptp, gpa, 2)
    assert isinstance(r, EptTranslation) and r.hpa == gpa and r.rights == 7
    assert v.get("VM_ENTRY_INTR_INFO_FIELD") == reinjected
    if reinjected & (1 << 11):
        assert v.get("VM_ENTRY_EXCEPTION_ERROR_CODE") == 0x1234


def test_l0_blocks_nmis_again_after_an_iret_that_unblocked_them():
    _m, l0, vcpu = _l0_with_vcpu()
    v = vcpu.vmcs
    v.store(0x4408, 0)
    v.set("GUEST_INTERRUPTIBILITY_INFO", 0)
    l0.h_ept_violation(_exit_with(vcpu, _violation(0x300000, Q_READ | Q_GLA | Q_TRANSLATION | Q_NMI_UNBLOCK)))
    assert v.get("GUEST_INTERRUPTIBILITY_INFO") & 8              # blocking by NMI


@pytest.mark.parametrize("gpa, match", [
    (0xFEC00000, "outside the guest's RAM"),     # (the I/O APIC's page: no MMIO emulation)
    (None, "mapped"),
])
def test_l0_violation_it_cannot_fix_is_a_guest_error(gpa, match):
    m, l0, vcpu = _l0_with_vcpu()
    if gpa is None:
        gpa = 0x200000
        l0.ept.map(gpa, gpa, 4096, rights=1)                     # mapped read-only by the L0
    l0.h_ept_violation(_exit_with(vcpu, _violation(gpa)))
    assert m.verdict == "error" and match in m.message


def test_l0_maps_the_apic_access_page_outside_ram():
    # KVM backs guest-physical 0xFEE00000 with its APIC-access page (a private memslot,
    # alloc_apic_access_page in 5.4): an EPT violation there is mapped, 4 KiB, like RAM
    from devirt_emu.vmx.ept import EptTranslation, ept_walk
    m, l0, vcpu = _l0_with_vcpu()
    l0.h_ept_violation(_exit_with(vcpu, _violation(0xFEE00080)))
    assert m.verdict is None
    r = ept_walk(m.mem.read, m.mem.write, l0.ept.eptp, 0xFEE00080, 2)
    assert isinstance(r, EptTranslation) and r.hpa == 0xFEE00080 and r.page_size == 4096


def test_l0_ept_misconfiguration_is_a_guest_error():
    from devirt_emu.vmx.rules import exit_decision
    m, l0, vcpu = _l0_with_vcpu()
    l0.h_ept_misconfig(_exit_with(vcpu, exit_decision(
        "EPT_MISCONFIG", ("EPT PTE memory type 2 is reserved",), guest_physical_address=0x5000)))
    assert m.verdict == "error"
    assert "EPT misconfiguration at GPA 0x5000" in m.message and "memory type 2" in m.message


# --- read-modify-write and non-canonical addresses -----------------------------------

@pytest.mark.parametrize("insn", ["add qword ptr [rbx], 1", "inc dword ptr [rbx]", "xchg [rbx], rax",
                                  "lock cmpxchg [rbx], rcx"])
@pytest.mark.parametrize("rights", [0, R])
def test_read_modify_write_reports_a_write(insn, rights):
    # SDM: an EPT violation caused by a read-modify-write sets bit 1; whether it also
    # sets bit 0 is implementation-specific (not checked)
    r = run_case(f"{insn}\ncpuid", regs={"rbx": SCRATCH_BASE + 0x40},
                 ept=identity_except((SCRATCH_BASE, rights)))
    e = ept_exit(r, EPT_VIOLATION)
    rights_bits = Q_R if rights else 0
    assert e.qualification & ~Q_READ == Q_WRITE | rights_bits | Q_GLA | Q_TRANSLATION


def test_read_modify_write_guest_page_fault_has_the_write_bit():
    # #PF error code bit 1 (W/R) for an RMW to a not-present page
    r = run_case("add qword ptr [rbx], 1\ncpuid", regs={"rbx": 0x4000_0000}, ept="identity",
                 vmcs={"EXCEPTION_BITMAP": 1 << PF})
    assert ept_exit(r, EXCEPTION_NMI).error_code == 2


def test_non_canonical_address_is_a_general_protection_fault():
    r = run_case("mov rax, [rbx]\ncpuid", regs={"rbx": 0x8000_0000_0000_0000}, ept="identity",
                 vmcs={"EXCEPTION_BITMAP": 1 << 13})
    e = ept_exit(r, EXCEPTION_NMI)
    assert e.interruption_info == 0x80000B0D and e.error_code == 0


# --- the guest walk of platform/tlb.py, on its own -------------------------------------------
# (a second stage that maps every guest-physical address to itself, read/write/execute)

class _IdentityStage:
    def __init__(self):
        self.seen = []

    def translate(self, gpa, access, gla, translation, peek):
        self.seen.append((gpa, access, translation))
        return gpa, 7


@pytest.fixture
def walker():
    from devirt_emu.machine import Machine
    from devirt_emu.platform import longmode
    m = Machine(cores=1, mem_mb=16)
    longmode.write_environment(m)
    longmode.enter(m.cores[0], CODE_BASE)
    core = m.cores[0]
    core.set_second_stage(_IdentityStage())
    return m, core


def _pf(core, linear, access, user=False):
    from devirt_emu.platform.paging import PageFault
    with pytest.raises(PageFault) as info:
        core.vtlb.translate(linear, access, user=user)
    assert info.value.linear == linear
    return info.value.error_code


def _set_pde(m, index, value):
    m.mem.write_u64(PD + 8 * index, value)


# #PF error code bits (SDM chapter "Paging", "Page-Fault Exceptions")
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16
ACC_R, ACC_W, ACC_X = 1, 2, 4


def test_walk_translates_and_sets_accessed_and_dirty(walker):
    m, core = walker
    assert core.vtlb.translate(SCRATCH_BASE + 0x123, ACC_R) == SCRATCH_BASE + 0x123
    assert m.mem.read_u64(PD + 16) & (P_A | P_D) == P_A
    assert core.vtlb.translate(SCRATCH_BASE + 0x123, ACC_W) == SCRATCH_BASE + 0x123
    assert m.mem.read_u64(PD + 16) & (P_A | P_D) == P_A | P_D
    assert m.mem.read_u64(PML4) & P_A and m.mem.read_u64(PDPT) & P_A


def test_walk_peek_changes_nothing(walker):
    m, core = walker
    before = m.mem.read(PML4, 3 * PAGE)
    core.vtlb.translate(SCRATCH_BASE, ACC_W, peek=True)
    assert m.mem.read(PML4, 3 * PAGE) == before


def test_walk_passes_every_guest_physical_access_through_the_second_stage(walker):
    _m, core = walker
    stage = core.vtlb.stage2
    core.vtlb.translate(SCRATCH_BASE + 8, ACC_R)
    reads = [(gpa, acc, tr) for gpa, acc, tr in stage.seen]
    # PML4E, PDPTE, PDE (reads of paging-structure entries), then the A-flag updates (locked
    # read-modify-writes: a data read and a data write, issue 14), then the data
    assert reads[:3] == [(PML4, ACC_R, False), (PDPT, ACC_R, False), (PD + 16, ACC_R, False)]
    assert (PD + 16, ACC_R | ACC_W, False) in reads
    assert reads[-1] == (SCRATCH_BASE + 8, ACC_R, True)


@pytest.mark.parametrize("pde, access, user, code", [
    (0, ACC_R, False, 0),                                  # not present
    (0, ACC_W, True, PF_W | PF_U),
    (0, ACC_X, False, PF_I),                               # fetch with EFER.NXE = 1
    (SCRATCH_BASE | 0x83, ACC_R, True, PF_P | PF_U),        # user access to a supervisor page
    (SCRATCH_BASE | 0x85, ACC_W, True, PF_P | PF_W | PF_U),  # user write to a read-only page
    (SCRATCH_BASE | 0x81, ACC_W, False, PF_P | PF_W),       # supervisor write, CR0.WP = 1
    (SCRATCH_BASE | 0x83 | (1 << 63), ACC_X, False, PF_P | PF_I),   # execute-disable
    (SCRATCH_BASE | 0x83 | (1 << 13), ACC_R, False, PF_P | PF_RSVD),   # 2 MiB PDE bit 13
    (SCRATCH_BASE | 0x83 | (1 << 46), ACC_R, False, PF_P | PF_RSVD),   # above MAXPHYADDR (46)
])
def test_walk_page_fault_error_codes(walker, pde, access, user, code):
    m, core = walker
    m.mem.write_u64(PML4, m.mem.read_u64(PML4) | 4)        # U/S on the upper levels
    m.mem.write_u64(PDPT, m.mem.read_u64(PDPT) | 4)
    _set_pde(m, 2, pde)
    assert _pf(core, SCRATCH_BASE + 0x10, access, user) == code


def test_walk_supervisor_write_to_read_only_page_without_wp(walker):
    from unicorn import x86_const as X
    m, core = walker
    _set_pde(m, 2, SCRATCH_BASE | 0x81)
    core.uc.reg_write(X.UC_X86_REG_CR0, core.uc.reg_read(X.UC_X86_REG_CR0) & ~(1 << 16))
    assert core.vtlb.translate(SCRATCH_BASE, ACC_W) == SCRATCH_BASE


def test_walk_xd_is_reserved_without_nxe(walker):
    from unicorn import x86_const as X
    m, core = walker
    core.uc.reg_write(X.UC_X86_REG_MSR, (0xC0000080, 0x500))      # LME | LMA, no NXE
    _set_pde(m, 2, SCRATCH_BASE | 0x83 | (1 << 63))
    assert _pf(core, SCRATCH_BASE, ACC_R) == PF_P | PF_RSVD
    _set_pde(m, 2, 0)
    assert _pf(core, SCRATCH_BASE, ACC_X) == 0                     # I/D only with NXE (or SMEP)


def test_walk_pml4e_with_ps_is_reserved(walker):
    m, core = walker
    m.mem.write_u64(PML4, m.mem.read_u64(PML4) | 0x80)
    assert _pf(core, SCRATCH_BASE, ACC_R) == PF_P | PF_RSVD


def test_walk_1g_and_4k_guest_pages(walker):
    m, core = walker
    m.mem.write_u64(PDPT + 8, 0x4000_0000 | 0x83)                  # 1 GiB page
    assert core.vtlb.translate(0x4000_0000 + 0x12345678, ACC_R) == 0x4000_0000 + 0x12345678
    m.mem.write_u64(PD + 8 * 5, 0x700000 | 0x3)                    # PDE 5 -> page table
    m.mem.write_u64(0x700000 + 8 * 7, 0x9000 | 0x3)                # PTE 7 -> 0x9000
    assert core.vtlb.translate(0xA07000 + 0x21, ACC_R) == 0x9021


def test_walk_non_canonical(walker):
    from devirt_emu.platform.tlb import NonCanonical
    _m, core = walker
    with pytest.raises(NonCanonical):
        core.vtlb.translate(0x0000_8000_0000_0000, ACC_R)


def test_first_write_after_a_read_still_sets_the_guest_dirty_flag():
    # the read's TLB entry must not let the write through unseen (Unicorn caches rights)
    runner = CaseRunner()
    r = runner.run("mov rax, [rbx]\nmov [rbx + 8], rax\nexit: cpuid", regs={"rbx": SCRATCH_BASE},
                   ept="identity")
    ept_exit(r, CPUID, rip=r.symbols["exit"])
    assert runner.machine.mem.read_u64(PD + 16) & (P_A | P_D) == P_A | P_D


def test_first_write_after_a_read_still_sets_the_ept_dirty_flag():
    # the guest's PDE is dirty already: only the EPT's dirty flag is left to set
    runner = CaseRunner()
    r = runner.run("mov rax, [rbx]\nmov [rbx + 8], rax\nexit: cpuid", regs={"rbx": SCRATCH_BASE},
                   memory={PD + 16: (SCRATCH_BASE | 0x83 | P_A | P_D).to_bytes(8, "little")},
                   ept="identity", ept_ad=True)
    ept_exit(r, CPUID, rip=r.symbols["exit"])
    pte = runner.ept.mem.read_u64(runner.ept.entry_address(SCRATCH_BASE, 1))
    assert pte & (EPT_A | EPT_D) == EPT_A | EPT_D


# --- the Unicorn 2.1.4 behaviour platform/tlb.py relies on (measured there) ----------------

def _engine(fill, code=b"", at=0x100000):
    from unicorn import UC_ARCH_X86, UC_HOOK_TLB_FILL, UC_MODE_64, UC_TLB_VIRTUAL, Uc
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 16 << 20)
    uc.mem_write(at, code)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    return uc


def _filler(log, deny=()):
    def fill(uc, vaddr, access, entry, data):
        log.append((vaddr, access))
        if vaddr in deny:
            return False
        entry.paddr, entry.perms = vaddr, 7
        return True
    return fill


MOV_RAX_RCX = b"\x48\x8b\x01"            # mov rax, [rcx]


def test_unicorn_refused_fill_ends_the_run_without_an_interrupt():
    from unicorn import UC_ERR_EXCEPTION, UC_HOOK_INTR, UcError
    from unicorn import x86_const as UX
    log, intr = [], []
    uc = _engine(_filler(log, deny={0x200000}), b"\x90" + MOV_RAX_RCX + b"\x90")
    uc.hook_add(UC_HOOK_INTR, lambda u, n, d: intr.append(n))
    uc.reg_write(UX.UC_X86_REG_RCX, 0x200010)
    with pytest.raises(UcError) as info:
        uc.emu_start(0x100000, 0x100005)
    assert info.value.errno == UC_ERR_EXCEPTION and intr == []
    assert uc.reg_read(UX.UC_X86_REG_RIP) == 0x100001              # at the instruction
    assert (0x200000, 16) in log                                   # the page, UC_MEM_READ


def test_unicorn_tlb_flushes():
    from unicorn import UC_TLB_CPU, UC_TLB_VIRTUAL
    from unicorn import x86_const as UX
    from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
    log = []
    uc = _engine(_filler(log), MOV_RAX_RCX + MOV_RAX_RCX)
    uc.reg_write(UX.UC_X86_REG_RCX, 0x200010)

    def data_fills():
        del log[:]
        uc.emu_start(0x100000, 0x100003)
        return [v for v, a in log if a == 16]
    assert data_fills() == [0x200000]
    assert data_fills() == []                                       # cached
    ctx = uc.context_save()
    uc.context_restore(ctx)
    assert data_fills() == []                                       # context_restore: no flush
    uc.ctl_set_tlb_mode(UC_TLB_CPU)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    assert data_fills() == []                                       # a mode switch: no flush
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
    assert data_fills() == [0x200000]
    uc.mem_protect(0x300000, 0x1000, 3)
    assert data_fills() == [0x200000]                               # mem_protect flushes


def test_unicorn_prot_hooks_report_physical_addresses_in_virtual_tlb_mode():
    from unicorn import UC_ERR_FETCH_PROT, UC_HOOK_MEM_FETCH_PROT, UcError

    def fill(uc, vaddr, access, entry, data):
        entry.paddr, entry.perms = vaddr - 0x300000, 7              # linear 0x400000 -> 0x100000
        return True
    uc = _engine(fill, b"\x90\x90")
    uc.mem_protect(0x100000, 0x1000, 3)                             # not executable
    seen = []
    uc.hook_add(UC_HOOK_MEM_FETCH_PROT, lambda u, a, addr, s, v, d: seen.append(addr) or False)
    with pytest.raises(UcError) as info:
        uc.emu_start(0x400000, 0x400002)
    assert info.value.errno == UC_ERR_FETCH_PROT and seen == [0x100000]


def test_ept_violation_while_delivering_int_n_has_its_instruction_length():
    # INT 0x40 (CD 40, 2 bytes): IDT-vectoring type 4 (software interrupt), and the
    # VM-exit instruction length is defined for exits during its delivery
    src = "int 0x40\nhandler: cpuid"
    sym = run_case(src).symbols
    r = run_case(src, ept=identity_except((STACK_TOP - PAGE, 0)),
                 memory={IDT + 16 * 0x40: interrupt_gate(sym["handler"])})
    e = ept_exit(r, EPT_VIOLATION)
    assert e.idt_vectoring_info == 0x80000440
    assert e.instruction_length == 2


def test_ept_table_outside_ram_ends_the_case_with_a_message():
    r = run_case("mov rax, [rbx]\ncpuid", regs={"rbx": SCRATCH_BASE},
                 ept=["identity", EptEntry(SCRATCH_BASE, 2, 0x7_0000_0000 | 7)])
    assert r.outcome == "no_exit" and r.no_exit.why == "stopped"
    assert "outside RAM" in r.no_exit.message
