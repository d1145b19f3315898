"""Nested paging (AMD APM Vol. 2, 15.25): the nested walk and NPF's EXITINFO.

Expected: EXITINFO1 is a #PF error code of the nested access (P set for a
protection violation, RW for a write, US always, since nested accesses are
user accesses; ID for a fetch) with bit 32 for the final guest-physical
address or bit 33 for an access to a guest page table; EXITINFO2 the
guest-physical address."""
from devirt_emu.platform.memory import PhysMem
from devirt_emu.platform.tlb import ACC_FETCH, ACC_READ, ACC_WRITE
from devirt_emu.svm.npt import NptBuilder, NptFault, npt_walk
from devirt_emu.testing.svm_case import SCRATCH_BASE, run_case

FINAL, PAGE = 1 << 32, 1 << 33


def _tables():
    mem = PhysMem(4 << 20)
    b = NptBuilder(mem, 0x300000, 0x40000)
    return mem, b


def test_walk_translates_and_sets_accessed_and_dirty():
    mem, b = _tables()
    b.map(0x5000, 0x9000)
    hpa, rights = npt_walk(mem, b.root, 0x5123, ACC_WRITE, final=True, set_flags=True)
    assert hpa == 0x9123 and rights & ACC_WRITE
    pte = mem.read_u64(b.entry_address(0x5000, 1))
    assert pte & 0x60 == 0x60                         # A and D
    assert mem.read_u64(b.entry_address(0x5000, 4)) & 0x20    # A on the PML4E


def test_not_present_readonly_supervisor_and_nx():
    mem, b = _tables()
    b.map(0x1000, 0x1000, present=False)
    b.map(0x2000, 0x2000, writable=False)
    b.map(0x3000, 0x3000, user=False)
    b.map(0x4000, 0x4000, nx=True)
    f = npt_walk(mem, b.root, 0x1000, ACC_READ, final=True, set_flags=False)
    assert isinstance(f, NptFault) and f.exit_info_1 == FINAL | 4 and f.gpa == 0x1000
    f = npt_walk(mem, b.root, 0x2000, ACC_WRITE, final=True, set_flags=False)
    assert f.exit_info_1 == FINAL | 7
    f = npt_walk(mem, b.root, 0x3000, ACC_READ, final=False, set_flags=False)
    assert f.exit_info_1 == PAGE | 5                  # a supervisor nested page denies all
    f = npt_walk(mem, b.root, 0x4000, ACC_FETCH, final=True, set_flags=False)
    assert f.exit_info_1 == FINAL | 1 << 4 | 5
    assert npt_walk(mem, b.root, 0x4000, ACC_READ, final=True, set_flags=False)[0] == 0x4000


def test_reserved_bit_sets_rsv():
    mem, b = _tables()
    b.map(0x6000, 0x6000)
    slot = b.entry_address(0x6000, 1)
    mem.write_u64(slot, mem.read_u64(slot) | 1 << 51)
    f = npt_walk(mem, b.root, 0x6000, ACC_READ, final=True, set_flags=False)
    assert f.exit_info_1 == FINAL | 1 | 4 | 8


def test_npf_on_a_write_to_a_read_only_page():
    r = run_case("mov byte ptr [0x400000], 1\ncpuid", intercepts=["CPUID"],
                 npt=["identity", {SCRATCH_BASE: (SCRATCH_BASE, "r")}])
    e = r.exit
    assert (e.code, e.name) == (0x400, "NPF")
    assert e.exit_info_1 == FINAL | 7 and e.exit_info_2 == SCRATCH_BASE
    assert e.next_rip == 0 and r.steps == 0


def test_npf_on_a_guest_page_table_access():
    # the fresh state's page directory for the first GiB is at 0x22000
    r = run_case("mov rax, [0x400000]", npt=["identity", {0x22000: (0x22000, "")}])
    assert r.exit.name == "NPF" and r.exit.exit_info_1 == PAGE | 4
    assert r.exit.exit_info_2 == 0x22000


def test_identity_npt_runs_the_guest():
    r = run_case("mov rax, [0x400000]\nmov byte ptr [0x400000], 2\ncpuid", intercepts=["CPUID"],
                 npt="identity")
    assert r.exit.name == "CPUID" and r.steps == 2
