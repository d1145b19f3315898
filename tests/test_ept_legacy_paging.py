"""32-bit and PAE guest paging at run time, under EPT and without it, and the
PDPTEs of PAE paging.

Expectations are literals from the Intel SDM:

* Vol. 3C "EPT Violations" and the table "Exit Qualification for EPT
  Violations": bit 0 read, 1 write, 2 fetch; bits 5:3 the AND of the R/W/X
  bits of the EPT entries walked; bit 7 GUEST_LINEAR_ADDRESS valid (clear for
  "an attempt to load the guest PDPTEs as part of the execution of the MOV CR
  instruction"); bit 8 set for the translation, clear for a guest
  paging-structure entry (GUEST_PHYSICAL_ADDRESS is then the entry's
  address).  Guest paging-structure reads are reads; setting their accessed
  and dirty flags is a write.  EPT violations are fault-like.
* Vol. 3C "Checks on Guest Page-Directory-Pointer-Table Entries" / "Loading
  Page-Directory-Pointer-Table Entries": a guest entered with PAE paging
  (CR0.PG, CR4.PAE, "IA-32e mode guest" 0) uses GUEST_PDPTR0-3 when "enable
  EPT" is 1, else the PDPTEs at CR3[31:5] in memory; a present PDPTE with a
  reserved bit (2:1, 8:5, 63:MAXPHYADDR) fails the VM entry: exit reason
  0x80000021 (33 with bit 31), exit qualification 2.  "Saving Non-Register
  State": with EPT and PAE paging a VM exit saves the PDPTEs in use.
* Vol. 3A "PDPTE Registers": MOV to CR3 with PAE paging loads them from the
  new CR3 (#GP(0) for a reserved bit, and the MOV has no effect), and so
  does MOV to CR4 changing PGE; rewriting the table in memory changes nothing
  until then.
* Vol. 3A "Paging": the 32-bit and PAE formats and #PF error codes (bit 0 P,
  1 W/R, 2 U/S, 3 RSVD, 4 I/D); a #PF that the exception bitmap intercepts
  exits with reason 0, interruption information 0x80000B0E (vector 14,
  hardware exception, error code valid) and the linear address as exit
  qualification.
* Vol. 3C "Treatment of Task Switches" and table "Exit Qualification for Task
  Switches": a task switch in VMX non-root operation exits (reason 9),
  qualification bits 15:0 the new TSS selector, bits 31:30 the source (2 JMP).

The guests run in 32-bit protected mode at CPL 0 with flat segments
(tests/test_task_switch.py's GDT and TSSs, TR = 0x18), code at CODE_BASE
(0x100000), stack at 0x90000.
"""
from __future__ import annotations

import struct

import pytest

from devirt_emu.asm import assemble
from devirt_emu.machine import Machine
from devirt_emu.testing.vmx_case import CODE_BASE, CaseRunner, legal_controls, run_case
from devirt_emu.vmx.vcpu import VmxVcpu
from legacy_guest import enter_protected_mode, legacy_machine, run_to_end, with_task_state
from test_task_switch import (EPT, GDT, GDT_LIMIT, IDT, REPORT, STACK, TSS32_BUSY, TSS_A,
                              TSS_B, flat_guest_state, guest_memory, ljmp, tss)

EXCEPTION_NMI, TASK_SWITCH, CPUID, EPT_VIOLATION = 0, 9, 10, 48
ENTRY_FAILURE_GUEST_STATE = 0x80000021
ENTRY_FAIL_PDPTE = 2
Q_READ, Q_WRITE, Q_FETCH = 1, 2, 4
Q_R, Q_W, Q_X = 1 << 3, 1 << 4, 1 << 5
Q_GLA, Q_TRANSLATION = 1 << 7, 1 << 8
R, W, X = 1, 2, 4
PF_INTR_INFO = 0x80000B0E                 # valid, hardware exception, error code, vector 14
GP_INTR_INFO = 0x80000B0D
P, RW, US, PS, A, D = 1, 2, 4, 0x80, 0x20, 0x40
XD = 1 << 63
CR0_PG_PE_ET_NE = 0x80000031
CR0_WP = 1 << 16
CR4_PSE, CR4_PAE, CR4_PGE, CR4_VMXE = 1 << 4, 1 << 5, 1 << 7, 1 << 13
EFER_NXE = 1 << 11
SECONDARY_EPT = 1 << 1
DATA = 0x400010                            # the linear address the tests read
VALUE = 0x1234_5678


def pm32(cr0: int, cr3: int, cr4: int, *, efer: int = 0, exceptions: int = 0,
         pdptrs=None) -> dict[str, int]:
    """VMCS fields of a 32-bit protected-mode guest at CPL 0 with paging as given."""
    f = legal_controls({"VM_ENTRY_CONTROLS": 1 << 15})       # load IA32_EFER, not IA-32e mode
    f.update({
        "EXCEPTION_BITMAP": exceptions,
        "GUEST_CR0": cr0, "CR0_READ_SHADOW": cr0, "GUEST_CR3": cr3,
        "GUEST_CR4": cr4 | CR4_VMXE, "CR4_READ_SHADOW": cr4, "GUEST_IA32_EFER": efer,
        **flat_guest_state(),
    })
    if pdptrs is not None:
        for i, e in enumerate(pdptrs):
            f[f"GUEST_PDPTR{i}"] = e
    return f


def run32(code: str, fields: dict, memory: dict, **kw):
    return run_case(".code32\n" + code, vmcs=fields, memory={**guest_memory(), **memory}, **kw)


def identity_except(*pages):
    """Identity EPT over the case's RAM, with (gpa, rights) overrides."""
    return ["identity", {gpa: (gpa, rights) for gpa, rights in pages}]


def exit_of(r, reason, rip=CODE_BASE):
    assert r.outcome == "exit", str(r)
    e = r.exit
    assert e.reason == reason and e.guest_rip == rip, str(r)
    return e


# ============================================================== 32-bit paging
PD32 = 0x700000
PT32 = [0x701000 + 0x1000 * i for i in range(4)]     # page tables of 0-4, 4-8, 8-12, 12-16 MiB


def paging32(pdes=None, ptes=None, *, at=PD32) -> dict[int, bytes]:
    """Identity map of 16 MiB with 4-KiB pages (supervisor, writable), A/D clear,
    the directory at ``at`` and its page tables in the 4 pages after it;
    ``pdes``/``ptes``: {linear address: entry} overrides."""
    pts = [at + 0x1000 * (1 + i) for i in range(4)]
    pd = bytearray(4096)
    for i, pt in enumerate(pts):
        struct.pack_into("<I", pd, 4 * i, pt | P | RW)
    for lin, e in (pdes or {}).items():
        struct.pack_into("<I", pd, 4 * (lin >> 22), e)
    out = {at: bytes(pd)}
    for i, pt in enumerate(pts):
        t = bytearray(4096)
        for j in range(1024):
            struct.pack_into("<I", t, 4 * j, ((i << 22) | (j << 12)) | P | RW)
        for lin, e in (ptes or {}).items():
            if lin >> 22 == i:
                struct.pack_into("<I", t, 4 * ((lin >> 12) & 0x3FF), e)
        out[pt] = bytes(t)
    return out


def pte32_address(lin: int) -> int:
    return PT32[lin >> 22] + 4 * ((lin >> 12) & 0x3FF)


READ_THEN_EXIT = "mov eax, [ebx]\nexit: cpuid"


def test_32bit_guest_under_identity_ept_reads_through_its_tables():
    runner = CaseRunner()
    r = runner.run(".code32\nmov eax, [ebx]\nmov dword ptr [ebx + 4], 7\nexit: cpuid",
                   vmcs=pm32(CR0_PG_PE_ET_NE, PD32, 0), regs={"rbx": DATA},
                   memory={**guest_memory(), **paging32(), DATA: struct.pack("<I", VALUE)},
                   ept="identity")
    e = exit_of(r, CPUID, r.symbols["exit"])
    assert e.regs["rax"] == VALUE
    mem = runner.machine.mem
    # accessed flags on the PDE and the PTE; dirty on the PTE written through
    assert mem.read_u32(PD32 + 4 * 1) & (A | D) == A
    assert mem.read_u32(pte32_address(DATA)) & (A | D) == A | D
    assert mem.read_u32(pte32_address(DATA + 0x1000)) & (A | D) == 0


def test_32bit_guest_pte_not_in_the_ept():
    r = run32(READ_THEN_EXIT, pm32(CR0_PG_PE_ET_NE, PD32, 0), paging32(), regs={"rbx": DATA},
              ept=identity_except((PT32[1], 0)))
    e = exit_of(r, EPT_VIOLATION)
    # a read of a paging-structure entry: bit 0, GLA valid, bit 8 clear, rights 000b
    assert e.qualification == Q_READ | Q_GLA
    assert e.guest_physical_address == pte32_address(DATA) == 0x702000
    assert e.guest_linear_address == DATA
    assert r.steps == 0


def test_32bit_guest_page_directory_not_in_the_ept_stops_the_first_fetch():
    r = run32(READ_THEN_EXIT, pm32(CR0_PG_PE_ET_NE, PD32, 0), paging32(),
              ept=identity_except((PD32, 0)))
    e = exit_of(r, EPT_VIOLATION)
    assert e.qualification == Q_READ | Q_GLA            # the PDE read of the code fetch
    assert e.guest_physical_address == PD32 + 4 * (CODE_BASE >> 22)
    assert e.guest_linear_address == CODE_BASE


def test_32bit_guest_translation_not_in_the_ept():
    # linear 0x400000 -> guest-physical 0x480000, which the EPT does not map
    r = run32(READ_THEN_EXIT, pm32(CR0_PG_PE_ET_NE, PD32, 0),
              paging32(ptes={0x400000: 0x480000 | P | RW}), regs={"rbx": DATA},
              ept=identity_except((0x480000, 0)))
    e = exit_of(r, EPT_VIOLATION)
    assert e.qualification == Q_READ | Q_GLA | Q_TRANSLATION
    assert e.guest_physical_address == 0x480010 and e.guest_linear_address == DATA


def test_32bit_guest_accessed_flag_on_a_read_only_page_table_is_a_write():
    r = run32(READ_THEN_EXIT, pm32(CR0_PG_PE_ET_NE, PD32, 0), paging32(), regs={"rbx": DATA},
              ept=identity_except((PT32[1], R)))
    e = exit_of(r, EPT_VIOLATION)
    # the accessed-flag update is a locked read-modify-write: data read and data write
    # (bits 0 and 1; kvm-unit-tests' ept_access_test_paddr_read_only_ad_disabled, issue 14)
    assert e.qualification == Q_READ | Q_WRITE | Q_R | Q_GLA
    assert e.guest_physical_address == pte32_address(DATA)


def test_32bit_guest_4m_page():
    # PDE 1 maps linear 4-8 MiB to physical 8-12 MiB with one 4-MiB page (CR4.PSE)
    r = run32(READ_THEN_EXIT, pm32(CR0_PG_PE_ET_NE, PD32, CR4_PSE),
              {**paging32(pdes={0x400000: 0x800000 | PS | P | RW}),
               DATA: struct.pack("<I", 1), 0x800010: struct.pack("<I", VALUE)},
              regs={"rbx": DATA}, ept="identity")
    assert exit_of(r, CPUID, r.symbols["exit"]).regs["rax"] == VALUE
    # the same PDE with CR4.PSE = 0 points to a page table at 0x800000 (zeros: not present)
    r = run32(READ_THEN_EXIT, pm32(CR0_PG_PE_ET_NE, PD32, 0, exceptions=1 << 14),
              paging32(pdes={0x400000: 0x800000 | PS | P | RW}), regs={"rbx": DATA},
              ept="identity")
    e = exit_of(r, EXCEPTION_NMI)
    assert (e.interruption_info, e.error_code, e.qualification) == (PF_INTR_INFO, 0, DATA)


def test_32bit_guest_4m_page_reserved_bit_21():
    r = run32(READ_THEN_EXIT, pm32(CR0_PG_PE_ET_NE, PD32, CR4_PSE, exceptions=1 << 14),
              paging32(pdes={0x400000: 0x800000 | (1 << 21) | PS | P | RW}), regs={"rbx": DATA},
              ept="identity")
    e = exit_of(r, EXCEPTION_NMI)
    assert (e.interruption_info, e.error_code, e.qualification) == (PF_INTR_INFO, 0x9, DATA)


@pytest.mark.parametrize("ept", ["identity", None])
def test_32bit_guest_write_protect_page_fault(ept):
    fields = pm32(CR0_PG_PE_ET_NE | CR0_WP, PD32, 0, exceptions=1 << 14)
    r = run32("mov dword ptr [ebx], 1\ncpuid", fields,
              paging32(ptes={0x400000: 0x400000 | P}), regs={"rbx": DATA}, ept=ept)
    e = exit_of(r, EXCEPTION_NMI)
    # P | W/R: a supervisor write to a read-only page with CR0.WP = 1
    assert (e.interruption_info, e.error_code, e.qualification) == (PF_INTR_INFO, 0x3, DATA)


# ============================================================== PAE paging
PDPT_PA = 0x710000
PD_A, PT_A, PD_B, PT_B = 0x711000, 0x712000, 0x713000, 0x714000
NEW_PDPT = 0x720020                      # a second table (CR3 bits 31:5), on its own page
B_TARGET = 0x800000                      # PD_B maps the linear page 0x400000 here


def pae_tables(*, pdpt0=PD_A | P, xd_page=None) -> dict[int, bytes]:
    """PD_A: 16 MiB identity, 2-MiB pages, except 4-6 MiB in 4-KiB pages (PT_A);
    PD_B: the same (PT_B) but the linear page 0x400000 -> B_TARGET.  The PDPT at PDPT_PA has
    ``pdpt0`` in entry 0; NEW_PDPT has PD_B in entry 0.  ``xd_page``: a linear
    page whose PTE sets XD."""
    pd_a, pd_b, pt_a = bytearray(4096), bytearray(4096), bytearray(4096)
    for i in range(8):
        struct.pack_into("<Q", pd_a, 8 * i, (i << 21) | PS | P | RW)
        struct.pack_into("<Q", pd_b, 8 * i, (i << 21) | PS | P | RW)
    struct.pack_into("<Q", pd_a, 8 * 2, PT_A | P | RW)
    struct.pack_into("<Q", pd_b, 8 * 2, PT_B | P | RW)
    for j in range(512):
        lin = 0x400000 | (j << 12)
        struct.pack_into("<Q", pt_a, 8 * j, lin | P | RW | (XD if lin == xd_page else 0))
    pt_b = bytearray(pt_a)
    struct.pack_into("<Q", pt_b, 0, B_TARGET | P | RW)
    return {PDPT_PA: struct.pack("<4Q", pdpt0, 0, 0, 0), PD_A: bytes(pd_a), PT_A: bytes(pt_a),
            PD_B: bytes(pd_b), PT_B: bytes(pt_b), NEW_PDPT: struct.pack("<4Q", PD_B | P, 0, 0, 0),
            DATA: struct.pack("<I", VALUE), B_TARGET + 0x10: struct.pack("<I", 0xB0B0)}


def pae_fields(pdptrs=(PD_A | P, 0, 0, 0), **kw) -> dict:
    return pm32(CR0_PG_PE_ET_NE, PDPT_PA, CR4_PAE, pdptrs=pdptrs, **kw)


def test_pae_guest_under_ept_and_its_pdptes_saved_at_exit():
    r = run32(READ_THEN_EXIT, pae_fields(), pae_tables(), regs={"rbx": DATA}, ept="identity")
    assert exit_of(r, CPUID, r.symbols["exit"]).regs["rax"] == VALUE
    assert [r.vmcs[f"GUEST_PDPTR{i}"] for i in range(4)] == [PD_A | P, 0, 0, 0]


def test_vm_entry_with_ept_loads_the_pdptes_from_the_vmcs_not_memory():
    # memory's PDPTE 0 says PD_A; GUEST_PDPTR0 says PD_B, which maps DATA to B_TARGET
    r = run32(READ_THEN_EXIT, pae_fields(pdptrs=(PD_B | P, 0, 0, 0)), pae_tables(),
              regs={"rbx": DATA}, ept="identity")
    assert exit_of(r, CPUID, r.symbols["exit"]).regs["rax"] == 0xB0B0
    # and the other way round
    r = run32(READ_THEN_EXIT, pae_fields(), pae_tables(pdpt0=PD_B | P),
              regs={"rbx": DATA}, ept="identity")
    assert exit_of(r, CPUID, r.symbols["exit"]).regs["rax"] == VALUE


@pytest.mark.parametrize("pdptr1", [
    0x5000 | P | (1 << 1),            # bit 1
    0x5000 | P | (1 << 7),            # bit 7 (8:5)
    0x5000 | P | (1 << 46),           # MAXPHYADDR (46)
    0x5000 | P | XD,                  # bit 63
])
def test_vm_entry_fails_for_a_present_pdptr_with_a_reserved_bit(pdptr1):
    r = run32(READ_THEN_EXIT, pae_fields(pdptrs=(PD_A | P, pdptr1, 0, 0)), pae_tables(),
              ept="identity")
    assert r.outcome == "entry_failure", str(r)
    f = r.entry_failure
    assert (f.exit_reason, f.qualification) == (ENTRY_FAILURE_GUEST_STATE, ENTRY_FAIL_PDPTE)


def test_vm_entry_ignores_reserved_bits_of_a_not_present_pdptr():
    r = run32(READ_THEN_EXIT, pae_fields(pdptrs=(PD_A | P, 0x5000 | (1 << 1) | XD, 0, 0)),
              pae_tables(), regs={"rbx": DATA}, ept="identity")
    assert exit_of(r, CPUID, r.symbols["exit"]).regs["rax"] == VALUE


def test_vm_entry_without_ept_checks_the_pdptes_in_memory():
    bad = pae_tables(pdpt0=PD_A | P | (1 << 2))
    r = run32(READ_THEN_EXIT, pae_fields(), bad)
    assert r.outcome == "entry_failure", str(r)
    assert (r.entry_failure.exit_reason, r.entry_failure.qualification) == \
        (ENTRY_FAILURE_GUEST_STATE, ENTRY_FAIL_PDPTE)
    # without EPT the GUEST_PDPTRn fields play no part (here: reserved bits, entry fine)
    r = run32(READ_THEN_EXIT, pae_fields(pdptrs=(P | (1 << 1), 0, 0, 0)), pae_tables(),
              regs={"rbx": DATA})
    assert exit_of(r, CPUID, r.symbols["exit"]).regs["rax"] == VALUE


@pytest.mark.parametrize("ept", [None, "identity"])
def test_vmresume_rechecks_the_pdptes_in_memory_only_without_ept(monkeypatch, ept):
    # after the first exit a reserved bit appears in the PDPTE in memory; the L0 then
    # only advances GUEST_RIP and resumes: without EPT the VM entry loads (and checks)
    # the PDPTEs from memory again, with EPT it loads GUEST_PDPTR0-3
    from devirt_emu.testing import vmx_case
    handle_exit = vmx_case._RecordingL0.handle_exit
    exits = []

    def break_the_pdpt_and_resume(self, vcpu):
        exits.append(vcpu.last_exit.name)
        if len(exits) > 1:
            return handle_exit(self, vcpu)
        vcpu.mem.write(PDPT_PA, struct.pack("<Q", PD_A | P | (1 << 7)))
        vcpu.skip_instruction()
        vcpu.vm_entry()
    monkeypatch.setattr(vmx_case._RecordingL0, "handle_exit", break_the_pdpt_and_resume)
    r = run32("cpuid\nsecond: cpuid", pae_fields(), pae_tables(), ept=ept)
    if ept is None:
        assert r.outcome == "entry_failure", str(r)
        assert (r.entry_failure.exit_reason, r.entry_failure.qualification) == \
            (ENTRY_FAILURE_GUEST_STATE, ENTRY_FAIL_PDPTE)
    else:
        exit_of(r, CPUID, r.symbols["second"])
    assert exits[0] == "CPUID"


def test_pae_guest_page_directory_not_in_the_ept():
    r = run32(READ_THEN_EXIT, pae_fields(), pae_tables(), regs={"rbx": DATA},
              ept=identity_except((PT_A, 0)))
    e = exit_of(r, EPT_VIOLATION)
    assert e.qualification == Q_READ | Q_GLA
    assert e.guest_physical_address == PT_A + 8 * 0      # PTE of linear 0x400000
    assert e.guest_linear_address == DATA


def test_mov_cr3_loads_the_pdptes_through_the_ept():
    # the new table's page is not in the EPT: the PDPTE load exits, with no linear address
    code = f"mov ecx, {NEW_PDPT:#x}\nthere: mov cr3, ecx\ncpuid"
    r = run32(code, pae_fields(), pae_tables(), ept=identity_except((NEW_PDPT & ~0xFFF, 0)))
    e = exit_of(r, EPT_VIOLATION, r.symbols["there"])
    assert e.qualification == Q_READ                    # bit 7 clear, rights 000b
    assert e.guest_physical_address == NEW_PDPT
    assert e.guest_linear_address is None
    assert r.steps == 1 and e.regs["cr3"] == PDPT_PA    # fault-like: CR3 unchanged


def test_mov_cr3_loads_new_pdptes_and_the_exit_saves_them():
    code = f"mov ecx, {NEW_PDPT:#x}\nmov cr3, ecx\nmov eax, [ebx]\nexit: cpuid"
    r = run32(code, pae_fields(), pae_tables(), regs={"rbx": DATA}, ept="identity")
    e = exit_of(r, CPUID, r.symbols["exit"])
    assert e.regs["rax"] == 0xB0B0 and e.regs["cr3"] == NEW_PDPT
    assert [r.vmcs[f"GUEST_PDPTR{i}"] for i in range(4)] == [PD_B | P, 0, 0, 0]


def test_pdpte_load_is_a_read_even_with_ept_accessed_and_dirty_flags():
    # EPTP bit 6 makes accesses to guest paging structures writes, but not the
    # PDPTE loads of MOV to CR3 (they have no guest-linear address): a read-only
    # page is enough for them
    code = f"mov ecx, {NEW_PDPT:#x}\nmov cr3, ecx\nmov eax, [ebx]\nexit: cpuid"
    tables = pae_tables()
    r = run32(code, pae_fields(), tables, regs={"rbx": DATA},
              ept=identity_except((NEW_PDPT & ~0xFFF, R)), ept_ad=True)
    assert exit_of(r, CPUID, r.symbols["exit"]).regs["rax"] == 0xB0B0


@pytest.mark.parametrize("ept", ["identity", None])
def test_mov_cr3_with_a_reserved_pdpte_is_gp0(ept):
    tables = pae_tables()
    tables[NEW_PDPT] = struct.pack("<4Q", PD_B | P, 0, 0x9000 | P | (1 << 5), 0)
    code = f"mov ecx, {NEW_PDPT:#x}\nthere: mov cr3, ecx\ncpuid"
    r = run32(code, pae_fields(exceptions=1 << 13), tables, ept=ept)
    e = exit_of(r, EXCEPTION_NMI, r.symbols["there"])
    assert (e.interruption_info, e.error_code) == (GP_INTR_INFO, 0)
    assert e.regs["cr3"] == PDPT_PA                      # the MOV had no effect


def test_pdpte_registers_are_not_reread_until_a_reload():
    # rewrite PDPTE 0 in memory (PD_A -> PD_B): INVLPG does not reload the registers,
    # MOV to CR4 changing PGE does
    code = (f"mov dword ptr [{PDPT_PA:#x}], {PD_B | P:#x}\n"
            "invlpg [ebx]\n"
            "mov eax, [ebx]\n"
            "mov ecx, cr4\nor ecx, 0x80\nmov cr4, ecx\n"
            "mov edx, [ebx]\nexit: cpuid")
    r = run32(code, pae_fields(), pae_tables(), regs={"rbx": DATA}, ept="identity")
    e = exit_of(r, CPUID, r.symbols["exit"])
    assert e.regs["rax"] == VALUE and e.regs["rdx"] == 0xB0B0
    assert r.vmcs["GUEST_PDPTR0"] == PD_B | P


def test_pae_execute_disable_fetch_is_a_page_fault_with_id():
    target = 0x405000
    r = run32(f"mov ecx, {target:#x}\njmp ecx", pae_fields(efer=EFER_NXE, exceptions=1 << 14),
              pae_tables(xd_page=target), ept="identity")
    e = exit_of(r, EXCEPTION_NMI, target)
    assert (e.interruption_info, e.error_code, e.qualification) == (PF_INTR_INFO, 0x11, target)


# ============================================================== task switches with paging on
def test_far_jmp_to_a_tss_with_32bit_paging_exits():
    # the descriptors are read through the guest's 32-bit paging
    for ept in (None, "identity"):
        r = run32("nop\nthere:\n" + ljmp(0x20), pm32(CR0_PG_PE_ET_NE, PD32, 0), paging32(),
                  ept=ept)
        e = exit_of(r, TASK_SWITCH, r.symbols["there"])
        assert e.qualification == 0x80000020 and e.instruction_length == 7
        assert r.steps == 1


def test_far_jmp_to_a_tss_with_pae_paging_exits():
    r = run32("there:\n" + ljmp(0x20), pae_fields(), pae_tables(), ept="identity")
    e = exit_of(r, TASK_SWITCH, r.symbols["there"])
    assert e.qualification == 0x80000020


PD32_B = 0xA00000                  # task B's page directory: another identity map, another 2 MiB


def run_paged_machine(source: str, *, under_l0: bool, task_b_cr3: int = PD32,
                      cr0: int = CR0_PG_PE_ET_NE, extra=None) -> Machine:
    """A 32-bit protected-mode program with 32-bit paging on (paging32's identity
    map; paging off with ``cr0`` = 0x31), natively or under the stock L0; task B
    (TSS_B) starts at ``task_b`` with CR3 = ``task_b_cr3``.  ``extra``: more
    memory to write."""
    code, syms = assemble(".code32\n" + source, CODE_BASE, "paged.S")
    m = legacy_machine(under_l0=under_l0, max_ns=1_000_000)
    for pa, blob in {**guest_memory(), **paging32(), **paging32(at=PD32_B), **(extra or {})}.items():
        if pa != EPT and pa != EPT + 0x1000:
            m.write_phys(pa, blob)
    m.write_phys(TSS_B, with_task_state(tss(), cr3=task_b_cr3, eip=syms["task_b"],
                                        esp=STACK - 0x1000))
    m.write_phys(CODE_BASE, code)
    enter_protected_mode(m.cores[0], gdt=(GDT, GDT_LIMIT), idt=(IDT, 256 * 8 - 1), cr3=PD32,
                         cr0=cr0, cs=0x08, data=0x10, tr=(0x18, TSS_A, 0x67, TSS32_BUSY),
                         esp=STACK, eip=CODE_BASE)
    m.syms = syms
    return run_to_end(m, under_l0=under_l0)


@pytest.mark.parametrize("under_l0", [False, True])
@pytest.mark.parametrize("task_b_cr3", [PD32, PD32_B])
def test_far_jmp_task_switch_with_32bit_paging_completes(under_l0, task_b_cr3):
    # under the L0 the TASK_SWITCH exit is handled as KVM does (the switch is performed)
    m = run_paged_machine("mov eax, 7\n" + ljmp(0x20) + "ud2\ntask_b:\n" + REPORT,
                          under_l0=under_l0, task_b_cr3=task_b_cr3)
    assert m.verdict == "pass", m.message
    core = m.cores[0]
    assert core.read_segment(7)[0] == 0x20                     # TR: the new task
    assert core.probe.cr(3) == task_b_cr3                      # its CR3
    saved_eax, = struct.unpack("<I", m.mem.read(TSS_A + 0x28, 4))
    assert saved_eax == 7                                      # the old task's state was saved
    assert core.events.get("TASK_SWITCH") == 1
    if under_l0:
        assert m.exit_counts.get("TASK_SWITCH") == 1


ENABLE_PAE = (f"mov ecx, {PDPT_PA:#x}\nmov cr3, ecx\n"
              f"mov ecx, {CR4_PAE:#x}\nmov cr4, ecx\n"
              f"mov ecx, cr0\nor ecx, 0x80000000\nthere: mov cr0, ecx\n")


def test_pae_guest_under_the_l0():
    # MOV to CR4 (PAE) and CR0 (PG) exit (stock: the L0 owns those bits); the L0 loads the
    # PDPTEs into GUEST_PDPTR0-3 as KVM's load_pdptrs does, and the guest runs through them
    src = ENABLE_PAE + (f"mov eax, [{DATA:#x}]\ncmp eax, {VALUE:#x}\njne bad\n" + REPORT +
                        "bad: mov al, 1\nout 0xf4, al\ntask_b:\n")
    m = run_paged_machine(src, under_l0=True, cr0=0x31, extra=pae_tables())
    assert m.verdict == "pass", m.message
    assert m.exit_counts.get("CR_ACCESS") == 2
    vcpu = m.l0.vcpus[0]
    assert [vcpu.vmcs.get(f"GUEST_PDPTR{i}") for i in range(4)] == [PD_A | P, 0, 0, 0]


def test_pae_paging_turned_on_with_a_reserved_pdpte_is_gp0_under_the_l0(monkeypatch):
    injected = []
    inject = VmxVcpu.inject

    def spy(self, vector, itype, error_code=None, length=0):
        injected.append((vector, itype, error_code, self.vmcs.get("GUEST_RIP")))
        inject(self, vector, itype, error_code, length)
    monkeypatch.setattr(VmxVcpu, "inject", spy)
    tables = pae_tables(pdpt0=PD_A | P | (1 << 6))
    m = run_paged_machine(ENABLE_PAE + REPORT + "task_b:\n", under_l0=True, cr0=0x31,
                          extra=tables)
    # the L0 injects #GP(0) (type 3: hardware exception) at the MOV to CR0, whose write
    # does not happen.  Its delivery reads the IDT, an EPT violation the first time, after
    # which the L0 injects the same event again (as KVM re-injects the IDT-vectoring
    # information); the IDT has no gate for #GP nor #DF: a triple fault ends the run
    assert injected and set(injected) == {(13, 3 << 8, 0, m.syms["there"])}
    assert m.verdict == "shutdown" and "triple fault" in m.message
    assert not m.cores[0].probe.cr(0) & 0x80000000


@pytest.mark.parametrize("under_l0", [False, True])
def test_task_switch_to_another_cr3_with_pae_paging_uses_its_pdptes(under_l0):
    # task B's CR3 is NEW_PDPT, whose PDPTE 0 is PD_B (DATA -> B_TARGET): the PDPTEs are
    # loaded from the new CR3 by the switch (under EPT: at the core's first walk after it)
    src = ENABLE_PAE + ljmp(0x20) + "ud2\ntask_b:\n" + (
        f"mov eax, [{DATA:#x}]\ncmp eax, 0xb0b0\njne bad\n" + REPORT
        + "bad: mov al, 1\nout 0xf4, al\n")
    m = run_paged_machine(src, under_l0=under_l0, cr0=0x31, task_b_cr3=NEW_PDPT,
                          extra=pae_tables())
    assert m.verdict == "pass", m.message
    core = m.cores[0]
    assert core.read_segment(7)[0] == 0x20 and core.probe.cr(3) == NEW_PDPT
    assert core.pdpte_registers()[0] == PD_B | P
